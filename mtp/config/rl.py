"""Optional section `rl`: joint RL after the supervised warm-up."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict

RL_TRAINABLE = ("both", "drafter", "main")
RL_ADVANTAGES = ("auto", "grpo", "rloo", "drgrpo")
RL_LOSSES = ("ppo", "reinforce")
RL_THOUGHT_MODES = ("fast", "slow", "learned")
RL_ROLLOUTS = ("think", "pause")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """RL after the supervised warm-up (`mtp.programs.rl`, `mtp.rl.learner`); the section `rl`.

    Each entry of `trainable` is one RL run started from the warm-up checkpoint,
    in WORKDIR/rl_<entry>: 'both' (main + drafter), 'drafter' (main frozen) or
    'main' (drafter frozen). A rollout thinks in `thought_mode` for at most
    `think_budget` main passes (0: until the cache fills), then answers in slow
    mode; its reward is the verifier's score minus `pass_price` per main pass. With
    `rollout='pause'` (program 'pause') the price is per pause, times the urgency.
    """

    task: str = "addition:digits=4"  # 'NAME[:key=value,...]', as data.corpus 'task:...'
    rollout: str = "think"  # rollout kind: 'think' (thought + answer) or 'pause' (learned pauses)
    trainable: tuple[str, ...] = ("both",)
    steps: int = 200
    prompts_per_step: int = 16
    group_size: int = 4  # rollouts per prompt: the group of GRPO / RLOO
    # decode oversample x prompts_per_step groups, train on (up to prompts_per_step of) those whose
    # rewards differ: equal-reward groups carry no GRPO/RLOO gradient (DAPO's dynamic sampling)
    oversample: int = 1
    # share of each step's problems re-drawn from train problems some rollout of theirs got wrong,
    # until every rollout solves them (prioritised replay of hard problems; at most replay_size)
    replay: float = 0.0
    replay_size: int = 256
    # 'grpo' (group-normalised), 'rloo' (leave-one-out), 'drgrpo' (mean-centred, no std) or
    # 'auto': rloo when passes are priced (pass_price > 0: the price keeps its size), else grpo
    advantage: str = "auto"
    loss: str = "ppo"  # 'ppo' (clipped ratio per pass) or 'reinforce'
    ppo_epochs: int = 2  # updates per batch of rollouts (the first is on-policy)
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # penalty on KL to the frozen warm-up policy (k3 estimator)
    # weight of KL(frozen warm-up main model || drafter) at every drafted token of the rollouts:
    # on-policy distillation (DistillSpec), a per-token signal where the reward is per rollout
    distill: float = 0.0
    # stop_gradient on the taps during RL (the warm-up's drafter.detach does not carry over:
    # a Medusa-style warm-up, main untouched by the drafter, can be followed by joint RL)
    detach: bool = False
    lr: float = 1e-4
    # the keep head's learning rate is keep_lr_scale * lr: a fresh head on a policy the rest of
    # which should move little (its logits start at 3; at lr 1e-4 Adam moves them ~0.01 in 90 steps)
    keep_lr_scale: float = 1.0
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # rollout sampling; log-probs are of the same tempered policy
    # 'fast', 'slow', or 'learned': adaptive thought whose keep decisions are the drafter's keep
    # head (drafter.emission), sampled in rollouts and scored by the RL objective
    thought_mode: str = "fast"
    # think rollouts: half the groups at urgency 0, half at 1, an input of the keep head (and of
    # the main model with model.use_urgency); the pass price is then paid times the urgency
    urgency: bool = False
    think_budget: int = 0  # main passes for the thought; then </think> is forced
    answer_max_tokens: int = 16
    # 'exact': reward = the verifier's score; 'partial': the share of the answer's characters
    # right, counted from the end (dense where few answers are exact; accuracy stays exact)
    reward: str = "exact"
    pass_price: float = 0.0  # reward -= pass_price * the rollout's cost (think: main passes)
    on_bad_reward: str = "skip"  # verifier raised / NaN: 'skip' the group (logged) or 'error'
    max_skipped_steps: int = 10  # consecutive steps with no usable rollout before stopping
    log_every: int = 5
    eval_every: int = 50
    eval_prompts: int = 64  # held-out problems for the greedy evaluation
    checkpoint_every: int = 25
    keep_checkpoints: int = 2

    def __post_init__(self):
        object.__setattr__(self, "trainable", tuple(str(t) for t in self.trainable))
        for name in (
            "steps", "prompts_per_step", "oversample", "replay_size", "ppo_epochs",
            "answer_max_tokens", "log_every", "eval_every", "eval_prompts", "checkpoint_every",
            "keep_checkpoints", "max_skipped_steps",
        ):  # fmt: skip
            v = getattr(self, name)
            check(v >= 1, f"rl.{name}", f"must be >= 1, got {v}")
        check(self.group_size >= 2, "rl.group_size", f"must be >= 2, got {self.group_size}")
        check(len(self.trainable) >= 1, "rl.trainable", f"needs one of {RL_TRAINABLE}")
        for t in self.trainable:
            check(t in RL_TRAINABLE, "rl.trainable", f"{t!r} not in {RL_TRAINABLE}")
        check(len(set(self.trainable)) == len(self.trainable), "rl.trainable", "has duplicates")
        for name, allowed in (
            ("advantage", RL_ADVANTAGES),
            ("loss", RL_LOSSES),
            ("thought_mode", RL_THOUGHT_MODES),
            ("rollout", RL_ROLLOUTS),
            ("on_bad_reward", ("skip", "error")),
            ("reward", ("exact", "partial")),
        ):
            v = getattr(self, name)
            check(v in allowed, f"rl.{name}", f"{v!r} not in {allowed}")
        check(self.lr > 0, "rl.lr", f"must be > 0, got {self.lr}")
        check(self.keep_lr_scale > 0, "rl.keep_lr_scale", f"must be > 0, got {self.keep_lr_scale}")
        check(0 <= self.replay <= 1, "rl.replay", f"must be in [0, 1], got {self.replay}")
        check(self.temperature > 0, "rl.temperature", f"must be > 0, got {self.temperature}")
        check(self.clip_eps > 0, "rl.clip_eps", f"must be > 0, got {self.clip_eps}")
        nonneg = ("kl_coef", "distill", "pass_price", "weight_decay", "warmup_steps")
        for name in (*nonneg, "think_budget"):
            v = getattr(self, name)
            check(v >= 0, f"rl.{name}", f"must be >= 0, got {v}")


def rl_config(config) -> RLConfig | None:
    """The `rl` section as an RLConfig, None if the config has none."""
    return from_dict(RLConfig, "rl", config.rl) if "rl" in config else None
