"""Optional section `sweep`: one run per drafter kind and k."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict
from mtp.config.model import DRAFTER_KINDS


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep over drafter k and kind (`mtp.programs.sweep`); the optional section `sweep`.

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
        check(len(self.ks) >= 1, "sweep.ks", "needs at least one k")
        for k in self.ks:
            check(k >= 1, "sweep.ks", f"every k must be >= 1, got {k}")
        check(len(self.kinds) >= 1, "sweep.kinds", f"needs one of {DRAFTER_KINDS}")
        for kind in self.kinds:
            check(kind in DRAFTER_KINDS, "sweep.kinds", f"{kind!r} not in {DRAFTER_KINDS}")
        check(len(set(self.ks)) == len(self.ks), "sweep.ks", "has duplicates")
        check(len(set(self.kinds)) == len(self.kinds), "sweep.kinds", "has duplicates")
        names = self.member_names
        check(
            self.only in ("", *names) or (self.only.isdigit() and int(self.only) < len(names)),
            "sweep.only",
            f"{self.only!r} is not a member; allowed: '' (all), {', '.join(names)} "
            f"or an index 0..{len(names) - 1}",
        )
        for name in ("speedup_prompts", "prompt_len", "new_tokens", "repeats"):
            v = getattr(self, name)
            low = 0 if name == "speedup_prompts" else 1
            check(v >= low, f"sweep.{name}", f"must be >= {low}, got {v}")

    @property
    def member_names(self) -> list[str]:
        """Run names in sweep order: every k of the first kind, then of the next."""
        return [f"k{k}_{kind}" for kind in self.kinds for k in self.ks]


def sweep_config(config) -> SweepConfig | None:
    """The `sweep` section as a SweepConfig, None if the config has none."""
    if "sweep" not in config:
        return None
    return from_dict(SweepConfig, "sweep", config.sweep)
