"""Optional section `pause`: pause tokens on a task (program 'pause')."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict

PAUSE_RULES = ("confidence", "entropy")


@dataclasses.dataclass(frozen=True)
class PauseConfig:
    """Pause tokens on a task (`mtp.programs.pause`); the section `pause`.

    Three models are fine-tuned on `task` ('NAME[:key=value,...]', its `n` the
    train examples): 'plain' (no pauses), 'paused' (M ~ U{0..max_pauses} `<pause>`
    tokens before the answer, their targets masked) and 'learned' (from
    'paused', `emit_steps` more steps in which the pauses *are* targets, then
    the `rl` section's steps of RL with the `pause` rollout: the model emits
    `<pause>` itself; reward = score - rl.pass_price * urgency * pauses, urgency
    0 or 1 per group). The report decodes `eval_prompts` held-out problems
    greedily with M in `eval_ms`, the `rule` ('confidence': pause while the top
    probability is below each of `thresholds`; 'entropy': while the entropy in
    nats is above it), at most `cap` pauses in a row, and the learned model at
    urgency 0 / 1.
    """

    task: str = "lookup:symbols=8,hops=2"
    max_pauses: int = 16
    eval_ms: tuple[int, ...] = (0, 1, 2, 4, 8, 16)
    eval_prompts: int = 256
    rule: str = "confidence"
    thresholds: tuple[float, ...] = (0.5, 0.8, 0.9, 0.95, 0.99)
    cap: int = 16
    emit_steps: int = 200

    def __post_init__(self):
        object.__setattr__(self, "eval_ms", tuple(int(m) for m in self.eval_ms))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        for name in ("eval_prompts", "cap"):
            v = getattr(self, name)
            check(v >= 1, f"pause.{name}", f"must be >= 1, got {v}")
        for name in ("max_pauses", "emit_steps"):
            v = getattr(self, name)
            check(v >= 0, f"pause.{name}", f"must be >= 0, got {v}")
        check(len(self.eval_ms) >= 1, "pause.eval_ms", "needs at least one M")
        for m in self.eval_ms:
            check(m >= 0, "pause.eval_ms", f"every M must be >= 0, got {m}")
        check(self.rule in PAUSE_RULES, "pause.rule", f"{self.rule!r} not in {PAUSE_RULES}")


def pause_config(config) -> PauseConfig | None:
    """The `pause` section as a PauseConfig, None if the config has none."""
    return from_dict(PauseConfig, "pause", config.pause) if "pause" in config else None
