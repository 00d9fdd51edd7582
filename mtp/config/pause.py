"""Optional section `pause`: pause tokens on a task."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, task_section
from mtp.config.rl import RL_LOSSES

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
            check(v >= 1, f"pause.{name}", f"must be >= 1, got {v}")
        for name in ("max_pauses", "emit_steps", "rl_steps", "pause_price"):
            v = getattr(self, name)
            check(v >= 0, f"pause.{name}", f"must be >= 0, got {v}")
        check(self.group_size >= 2, "pause.group_size", f"must be >= 2, got {self.group_size}")
        check(len(self.eval_ms) >= 1, "pause.eval_ms", "needs at least one M")
        for m in self.eval_ms:
            check(m >= 0, "pause.eval_ms", f"every M must be >= 0, got {m}")
        check(self.rule in PAUSE_RULES, "pause.rule", f"{self.rule!r} not in {PAUSE_RULES}")
        check(self.rl_lr > 0, "pause.rl_lr", f"must be > 0, got {self.rl_lr}")
        check(self.rl_loss in RL_LOSSES, "pause.rl_loss", f"{self.rl_loss!r} not in {RL_LOSSES}")


def pause_config(config) -> PauseConfig | None:
    """The `pause` section as a PauseConfig, None if the config has none; checks the task."""
    return task_section(PauseConfig, "pause", config)
