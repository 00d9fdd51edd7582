"""Running parity of a bit string: state tracking with one step per input bit.

    prompt  "parity 10110011 0110?"
    thought "11011101 1011"
    answer  "1"

Thought character i is the parity of bits 0..i (the state after reading bit i),
grouped in eights exactly like the prompt, so step i sits at a fixed offset
from bit i. The answer is the parity of the whole string (the last state).
Each step depends on the one before, so the thought cannot be drafted far
ahead without tracking the state: a stress test for multi-token passes.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

from mtp.data.format import render
from mtp.data.tasks.base import Example, Task, check_range

GROUP = 8


def _grouped(bits: str) -> str:
    return " ".join(bits[i : i + GROUP] for i in range(0, len(bits), GROUP))


def _worked(bits: str) -> Example:
    running = "".join(str(x % 2) for x in itertools.accumulate(map(int, bits)))
    return Example(f"parity {_grouped(bits)}?", _grouped(running), running[-1])


@dataclasses.dataclass(frozen=True)
class Parity(Task):
    """Parity of `bits` random bits, with the running parity as the thought."""

    name = "parity"
    bits: int = 64

    def __post_init__(self):
        check_range(self.name, "bits", self.bits, 1, 200)

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        return _worked("".join(rng.choice("01") for _ in range(self.bits)))

    def solve(self, prompt: str) -> str:
        if not (prompt.startswith("parity ") and prompt.endswith("?")):
            raise ValueError(f"not a parity prompt: {prompt!r}")
        bits = prompt[len("parity ") : -1]
        if not bits or _grouped(bits.replace(" ", "")) != bits or set(bits) - set("01 "):
            raise ValueError(f"not a parity prompt: {prompt!r}")
        return str(bits.count("1") % 2)

    @property
    def max_len(self) -> int:
        return len(render(_worked("0" * self.bits)))  # every text is this long
