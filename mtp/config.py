"""Config defaults and validation.

Experiments are `ml_collections.ConfigDict`s (see `experiments/`); modules never
read them. At the edge, each section is converted once into a small frozen
dataclass whose `__post_init__` validates it, so a wrong value fails before
anything compiles, with a `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint); `mtp.run` prints it on one line."""


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the field and what is allowed."""


def _check(ok: bool, field: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config.{field}: {msg}")


def _from_dict(cls, section: str, d: Mapping[str, Any] | ml_collections.ConfigDict, **extra):
    """Builds dataclass `cls` from config section `d`, rejecting unknown fields by name."""
    d = dict(d.to_dict() if isinstance(d, ml_collections.ConfigDict) else d)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in d:
        _check(
            key in names, f"{section}.{key}", f"unknown field; allowed: {', '.join(sorted(names))}"
        )
    d.update(extra)
    return cls(**d)


DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Main decoder-only transformer."""

    vocab_size: int = 264
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention when < n_heads
    d_ff: int = 0  # 0: 8/3 * d_model rounded up to a multiple of 32
    max_len: int = 512  # longest sequence the model (and its KV cache) supports
    rope_base: float = 10_000.0
    tie_embeddings: bool = True
    n_registers: int = 0  # learned extra positions that carry no output
    taps: tuple[int, ...] = (-1,)  # blocks whose output the drafter reads
    dtype: str = "float32"  # compute dtype; parameters stay float32
    norm_eps: float = 1e-6
    use_urgency: bool = False  # embed an urgency scalar in [0, 1] at every position

    def __post_init__(self):
        object.__setattr__(self, "taps", tuple(int(t) for t in self.taps))
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_len"):
            _check(
                getattr(self, name) >= 1,
                f"model.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        _check(
            self.d_model % self.n_heads == 0,
            "model.n_heads",
            f"must divide d_model={self.d_model}, got {self.n_heads}",
        )
        _check(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            f"must divide n_heads={self.n_heads}, got {self.n_kv_heads}",
        )
        _check(
            (self.d_model // self.n_heads) % 2 == 0, "model.d_model", "head dim must be even (RoPE)"
        )
        _check(self.n_registers >= 0, "model.n_registers", f"must be >= 0, got {self.n_registers}")
        _check(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} not in {DTYPES}")
        _check(len(self.taps) >= 1, "model.taps", "needs at least one layer")
        for t in self.taps:
            _check(
                -self.n_layers <= t < self.n_layers,
                "model.taps",
                f"layer {t} is outside the model; allowed 0..{self.n_layers - 1} "
                f"(or -{self.n_layers}..-1 from the top)",
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ff_dim(self) -> int:
        return self.d_ff or -(-(8 * self.d_model // 3) // 32) * 32

    @property
    def tap_layers(self) -> tuple[int, ...]:
        """Tap indices normalised to 0..n_layers-1."""
        return tuple(t % self.n_layers for t in self.taps)


DRAFTER_KINDS = ("transformer", "medusa", "rnn")


@dataclasses.dataclass(frozen=True)
class DrafterConfig:
    """Drafter reading the main model's taps; drafts y_1..y_k after the main token y_0."""

    kind: str = "transformer"
    k: int = 4
    d_model: int = 0  # 0: the main model's d_model
    n_layers: int = 1  # transformer drafter: causal layers over the k draft steps
    n_heads: int = 4
    detach: bool = False  # stop_gradient on the taps: Medusa-1 style, main untouched

    def __post_init__(self):
        _check(self.kind in DRAFTER_KINDS, "drafter.kind", f"{self.kind!r} not in {DRAFTER_KINDS}")
        _check(self.k >= 1, "drafter.k", f"must be >= 1, got {self.k}")
        _check(self.n_layers >= 1, "drafter.n_layers", f"must be >= 1, got {self.n_layers}")
        _check(self.d_model >= 0, "drafter.d_model", f"must be >= 0, got {self.d_model}")


def model_config(config) -> ModelConfig:
    return _from_dict(ModelConfig, "model", config.model)


def drafter_config(config) -> DrafterConfig:
    dc = _from_dict(DrafterConfig, "drafter", config.drafter)
    d = dc.d_model or config.model.d_model
    _check(
        d % dc.n_heads == 0, "drafter.n_heads", f"must divide drafter width {d}, got {dc.n_heads}"
    )
    return dc


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Text corpus and batching. `corpus`: 'stdlib' (the bundled default: this
    Python's standard-library source), 'files:PATH_OR_GLOB' (local text files),
    'tfds:NAME[/CONFIG]:SPLIT[:FEATURE]' (a prepared tfds dataset, see data_dir) or
    'task:NAME[:key=value,...]' (worked task examples, one per row: `data.task_data`)."""

    corpus: str = "stdlib"
    seq_len: int = 256  # tokens per training row
    batch_size: int = 16  # global batch, split over hosts and devices
    seed: int = 0
    eval_fraction: float = 0.05  # share of documents held out for evaluation
    data_dir: str = ""  # tfds data_dir ('' = tfds default)
    max_bytes: int = 0  # cap on corpus bytes read (0 = all)
    pause_rate: float = 0.0  # chance per position of inserting a <pause> (pause training)

    def __post_init__(self):
        _check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        _check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(
            0.0 < self.eval_fraction < 1.0,
            "data.eval_fraction",
            f"must be in (0, 1), got {self.eval_fraction}",
        )
        _check(self.max_bytes >= 0, "data.max_bytes", f"must be >= 0, got {self.max_bytes}")
        _check(
            0.0 <= self.pause_rate < 1.0,
            "data.pause_rate",
            f"must be in [0, 1), got {self.pause_rate}",
        )
        kinds = ("stdlib", "files:", "tfds:", "task:")
        _check(
            self.corpus == "stdlib" or self.corpus.startswith(kinds[1:]),
            "data.corpus",
            f"{self.corpus!r} is not one of 'stdlib', 'files:PATH_OR_GLOB', 'tfds:NAME:SPLIT', "
            "'task:NAME[:key=value,...]'",
        )


def data_config(config) -> DataConfig:
    return _from_dict(DataConfig, "data", config.data)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, loss weights and cadence of the supervised loop."""

    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    draft_weight: float = 1.0  # drafter loss weight against the main loss
    draft_decay: float = 0.8  # geometric per-offset weights 1, d, d^2, ... (normalised)
    distill_weight: float = 0.0  # drafter onto the main model's own distribution
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    sharding: str = "replicate"  # parameters: 'replicate' or 'fsdp' (sharded over devices)

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
            _check(
                getattr(self, name) >= 1,
                f"train.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(
            self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        )
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(
            0 < self.draft_decay <= 1,
            "train.draft_decay",
            f"must be in (0, 1], got {self.draft_decay}",
        )
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(
            self.sharding in ("replicate", "fsdp"),
            "train.sharding",
            f"{self.sharding!r} not in ('replicate', 'fsdp')",
        )


def train_config(config) -> TrainConfig:
    return _from_dict(TrainConfig, "train", config.train)


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default; experiments override a few. Locked: typos fail."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dataclasses.asdict(ModelConfig())
    c.drafter = dataclasses.asdict(DrafterConfig())
    c.data = dataclasses.asdict(DataConfig())
    c.train = dataclasses.asdict(TrainConfig())
    return c


RL_TRAINABLE = ("both", "drafter", "main")
RL_ADVANTAGES = ("grpo", "rloo")
RL_LOSSES = ("ppo", "reinforce")
RL_THOUGHT_MODES = ("fast", "slow")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Joint RL after the supervised warm-up (`mtp.train.rl_loop`); the optional section `rl`.

    Each entry of `trainable` is one RL run started from the warm-up checkpoint,
    in WORKDIR/rl_<entry>: 'both' (main + drafter), 'drafter' (main frozen) or
    'main' (drafter frozen). A rollout thinks in `thought_mode` for at most
    `think_budget` main passes (0: until the cache fills), then answers in slow
    mode; its reward is the verifier's score minus `pass_price` per main pass.
    """

    task: str = "addition:digits=4"  # 'NAME[:key=value,...]', as data.corpus 'task:...'
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
    advantage: str = "grpo"  # 'grpo' (group-normalised) or 'rloo' (leave-one-out)
    loss: str = "ppo"  # 'ppo' (clipped ratio per pass) or 'reinforce'
    ppo_epochs: int = 2  # updates per batch of rollouts (the first is on-policy)
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # penalty on KL to the frozen warm-up policy (k3 estimator)
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0  # rollout sampling; log-probs are of the same tempered policy
    thought_mode: str = "fast"
    think_budget: int = 0  # main passes for the thought; then </think> is forced
    answer_max_tokens: int = 16
    pass_price: float = 0.0  # reward -= pass_price * main passes of the rollout
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
            _check(v >= 1, f"rl.{name}", f"must be >= 1, got {v}")
        _check(self.group_size >= 2, "rl.group_size", f"must be >= 2, got {self.group_size}")
        _check(len(self.trainable) >= 1, "rl.trainable", f"needs one of {RL_TRAINABLE}")
        for t in self.trainable:
            _check(t in RL_TRAINABLE, "rl.trainable", f"{t!r} not in {RL_TRAINABLE}")
        _check(len(set(self.trainable)) == len(self.trainable), "rl.trainable", "has duplicates")
        for name, allowed in (
            ("advantage", RL_ADVANTAGES),
            ("loss", RL_LOSSES),
            ("thought_mode", RL_THOUGHT_MODES),
            ("on_bad_reward", ("skip", "error")),
        ):
            v = getattr(self, name)
            _check(v in allowed, f"rl.{name}", f"{v!r} not in {allowed}")
        _check(self.lr > 0, "rl.lr", f"must be > 0, got {self.lr}")
        _check(0 <= self.replay <= 1, "rl.replay", f"must be in [0, 1], got {self.replay}")
        _check(self.temperature > 0, "rl.temperature", f"must be > 0, got {self.temperature}")
        _check(self.clip_eps > 0, "rl.clip_eps", f"must be > 0, got {self.clip_eps}")
        for name in ("kl_coef", "pass_price", "weight_decay", "warmup_steps", "think_budget"):
            v = getattr(self, name)
            _check(v >= 0, f"rl.{name}", f"must be >= 0, got {v}")


def _task_section(cls, section: str, config):
    """Section `section` as a `cls`, None if the config has none; its `task` spec must parse."""
    if section not in config:
        return None
    sc = _from_dict(cls, section, config[section])
    from mtp.data.task_data import parse_task_spec  # tasks import this module

    try:
        parse_task_spec(sc.task)
    except ConfigError as e:
        raise ConfigError(f"config.{section}.task: {e}") from None
    return sc


def rl_config(config) -> RLConfig | None:
    """The `rl` section as an RLConfig, None if the config has none; checks the task spec."""
    return _task_section(RLConfig, "rl", config)


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep over drafter k and kind (`mtp.sweeps`); the optional section `sweep`.

    One run per (kind, k), named 'k{k}_{kind}', in WORKDIR/<name>, each the
    rest of the config with drafter.k and drafter.kind set. `only` runs one
    member (its name, or its index in kinds x ks order) instead of all in
    sequence, so members can run on separate hosts. After training, each run
    decodes `speedup_prompts` held-out prompts (their first `prompt_len` tokens)
    greedily for `new_tokens` tokens at batch 1 in slow and speculative mode;
    each timing is the best of `repeats`. 0 prompts skips the measurement.
    """

    ks: tuple[int, ...] = (1, 2, 4, 8)
    kinds: tuple[str, ...] = ("transformer",)
    only: str = ""
    speedup_prompts: int = 4
    prompt_len: int = 64
    new_tokens: int = 64
    repeats: int = 2

    def __post_init__(self):
        object.__setattr__(self, "ks", tuple(int(k) for k in self.ks))
        object.__setattr__(self, "kinds", tuple(str(k) for k in self.kinds))
        _check(len(self.ks) >= 1, "sweep.ks", "needs at least one k")
        for k in self.ks:
            _check(k >= 1, "sweep.ks", f"every k must be >= 1, got {k}")
        _check(len(self.kinds) >= 1, "sweep.kinds", f"needs one of {DRAFTER_KINDS}")
        for kind in self.kinds:
            _check(kind in DRAFTER_KINDS, "sweep.kinds", f"{kind!r} not in {DRAFTER_KINDS}")
        _check(len(set(self.ks)) == len(self.ks), "sweep.ks", "has duplicates")
        _check(len(set(self.kinds)) == len(self.kinds), "sweep.kinds", "has duplicates")
        names = self.member_names
        _check(
            self.only in ("", *names) or (self.only.isdigit() and int(self.only) < len(names)),
            "sweep.only",
            f"{self.only!r} is not a member; allowed: '' (all), {', '.join(names)} "
            f"or an index 0..{len(names) - 1}",
        )
        for name in ("speedup_prompts", "prompt_len", "new_tokens", "repeats"):
            v = getattr(self, name)
            low = 0 if name == "speedup_prompts" else 1
            _check(v >= low, f"sweep.{name}", f"must be >= {low}, got {v}")

    @property
    def member_names(self) -> list[str]:
        """Run names in sweep order: every k of the first kind, then of the next."""
        return [f"k{k}_{kind}" for kind in self.kinds for k in self.ks]


def sweep_config(config) -> SweepConfig | None:
    """The `sweep` section as a SweepConfig, None if the config has none."""
    if "sweep" not in config:
        return None
    return _from_dict(SweepConfig, "sweep", config.sweep)


PAUSE_RULES = ("confidence", "entropy")


@dataclasses.dataclass(frozen=True)
class PauseConfig:
    """Pause tokens on a task (`mtp.train.pause`); the optional section `pause`.

    Three models are fine-tuned on `task` ('NAME[:key=value,...]'; `n` train
    examples): 'plain' (no pauses), 'paused' (M ~ U{0..max_pauses} `<pause>`
    tokens before the answer, their targets masked) and 'learned' (from
    'paused', `emit_steps` more steps in which the pauses *are* targets, then
    `rl_steps` of RL where the model emits `<pause>` itself at temperature 1;
    reward = score - pause_price * urgency * pauses, urgency 0 or 1 per group).
    The report decodes `eval_prompts` held-out problems greedily with M in
    `eval_ms`, the `rule` ('confidence': pause while the top probability is
    below each of `thresholds`; 'entropy': while the entropy in nats is above
    it), at most `cap` pauses in a row, and the learned model at urgency 0 / 1.
    """

    task: str = "lookup:symbols=8,hops=2"
    n: int = 20_000
    max_pauses: int = 16
    eval_ms: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    eval_prompts: int = 256
    rule: str = "confidence"
    thresholds: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    cap: int = 16
    emit_steps: int = 200
    rl_steps: int = 60
    prompts_per_step: int = 16
    group_size: int = 8
    pause_price: float = 0.05
    rl_lr: float = 3e-4
    rl_loss: str = "reinforce"

    def __post_init__(self):
        object.__setattr__(self, "eval_ms", tuple(int(m) for m in self.eval_ms))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        for name in ("n", "eval_prompts", "cap", "prompts_per_step"):
            v = getattr(self, name)
            _check(v >= 1, f"pause.{name}", f"must be >= 1, got {v}")
        for name in ("max_pauses", "emit_steps", "rl_steps", "pause_price"):
            v = getattr(self, name)
            _check(v >= 0, f"pause.{name}", f"must be >= 0, got {v}")
        _check(self.group_size >= 2, "pause.group_size", f"must be >= 2, got {self.group_size}")
        _check(len(self.eval_ms) >= 1, "pause.eval_ms", "needs at least one M")
        for m in self.eval_ms:
            _check(m >= 0, "pause.eval_ms", f"every M must be >= 0, got {m}")
        _check(self.rule in PAUSE_RULES, "pause.rule", f"{self.rule!r} not in {PAUSE_RULES}")
        _check(self.rl_lr > 0, "pause.rl_lr", f"must be > 0, got {self.rl_lr}")
        _check(self.rl_loss in RL_LOSSES, "pause.rl_loss", f"{self.rl_loss!r} not in {RL_LOSSES}")


def pause_config(config) -> PauseConfig | None:
    """The `pause` section as a PauseConfig, None if the config has none; checks the task."""
    return _task_section(PauseConfig, "pause", config)


@dataclasses.dataclass(frozen=True)
class Configs:
    """All sections of a config, validated together."""

    model: ModelConfig
    drafter: DrafterConfig
    data: DataConfig
    train: TrainConfig
    seed: int
    rl: RLConfig | None = None
    sweep: SweepConfig | None = None
    pause: PauseConfig | None = None


def validate(config, min_vocab: int = 262) -> Configs:
    """Validates every section and the checks that span sections; raises ConfigError."""
    known = {"seed", "model", "drafter", "data", "train", "rl", "pause", "decode", "sweep"}
    for key in config.keys():
        _check(key in known, key, f"unknown section; allowed: {', '.join(sorted(known))}")
    cs = Configs(
        model=model_config(config),
        drafter=drafter_config(config),
        data=data_config(config),
        train=train_config(config),
        seed=int(config.seed),
        rl=rl_config(config),
        sweep=sweep_config(config),
        pause=pause_config(config),
    )
    _check(
        cs.data.seq_len <= cs.model.max_len,
        "data.seq_len",
        f"{cs.data.seq_len} is above the model's maximum (model.max_len={cs.model.max_len})",
    )
    _check(
        cs.model.vocab_size >= min_vocab,
        "model.vocab_size",
        f"must be >= {min_vocab} (the tokenizer's vocabulary), got {cs.model.vocab_size}",
    )
    if cs.pause is not None:
        _check(cs.rl is None and cs.sweep is None, "pause", "cannot be combined with rl or sweep")
        _check(cs.model.use_urgency, "model.use_urgency", "must be True with a pause section")
        from mtp.data.task_data import parse_task_spec  # tasks import this module
        from mtp.data.tasks.base import MARKS_LEN

        task, _ = parse_task_spec(cs.pause.task)
        answer = task.max_answer_len + 1  # + <eos>
        # <bos> prompt <think> thought </think>: the marks are one token each
        head = 1 + task.max_len - MARKS_LEN - task.max_answer_len + 2
        need = head + max(max(cs.pause.eval_ms, default=0), cs.pause.cap) + answer
        _check(
            cs.model.max_len >= need,
            "model.max_len",
            f"must be >= {need} for pause.task's prompts with max(pause.eval_ms) pauses or "
            f"pause.cap={cs.pause.cap} pauses before the answer, got {cs.model.max_len}",
        )
    if cs.sweep is not None:
        _check(cs.rl is None, "sweep", "a sweep of RL runs is not supported; drop the rl section")
        sp = cs.sweep
        _check(
            sp.prompt_len <= cs.data.seq_len,
            "sweep.prompt_len",
            f"{sp.prompt_len} is above data.seq_len={cs.data.seq_len} (prompts are held-out rows)",
        )
        _check(
            sp.prompt_len + sp.new_tokens <= cs.model.max_len,
            "sweep.new_tokens",
            f"prompt_len + new_tokens = {sp.prompt_len + sp.new_tokens} is above the model's "
            f"cache (model.max_len={cs.model.max_len})",
        )
    return cs
