"""Multi-digit times small multi-digit, partial products written out and summed.

    prompt  "4821*37="
    thought "4821*7=33747 4821*30=144630 33747+144630=178377"
    answer  "178377"

One partial product per digit of the multiplier, units first, each with its
place's zeros (`4821*30`), so the running sum is plain addition; after every
partial product but the first comes `total+partial=new total`. The answer is
the product in decimal (the last running total). With `thought=0` the
thought is empty: the product is answered straight away (a pause-token task).
"""

from __future__ import annotations

import dataclasses
import random
import re

from mtp.data.format import render
from mtp.data.tasks.addition import draw
from mtp.data.tasks.base import Example, Task, check_range

_PROMPT = re.compile(r"([0-9]+)\*([0-9]+)=")


def _worked(a: int, b: int, written: bool = True) -> Example:
    if not written:
        return Example(f"{a}*{b}=", "", str(a * b))
    steps, total = [], 0
    for place, digit in enumerate(reversed(str(b))):
        factor = int(digit) * 10**place
        steps.append(f"{a}*{digit}{'0' * place}={a * factor}")
        if place:
            steps.append(f"{total}+{a * factor}={total + a * factor}")
        total += a * factor
    return Example(f"{a}*{b}=", " ".join(steps), str(a * b))


@dataclasses.dataclass(frozen=True)
class Multiplication(Task):
    """Product of a random `digits`-digit and a `multiplier_digits`-digit number;
    `thought` 1 writes the partial products, 0 not."""

    name = "multiplication"
    digits: int = 4
    multiplier_digits: int = 2
    thought: int = 1

    def __post_init__(self):
        check_range(self.name, "digits", self.digits, 1, 16)
        check_range(self.name, "multiplier_digits", self.multiplier_digits, 1, 5)
        check_range(self.name, "thought", self.thought, 0, 1)

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        a, b = draw(rng, self.digits), draw(rng, self.multiplier_digits)
        return _worked(a, b, bool(self.thought))

    def solve(self, prompt: str) -> str:
        m = _PROMPT.fullmatch(prompt)
        if not m:
            raise ValueError(f"not a multiplication prompt: {prompt!r}")
        return str(int(m[1]) * int(m[2]))

    @property
    def max_len(self) -> int:
        # All nines make every number in the text as long as it can be.
        nines = (10**self.digits - 1, 10**self.multiplier_digits - 1)
        return len(render(_worked(*nines, bool(self.thought))))

    @property
    def max_answer_len(self) -> int:
        return self.digits + self.multiplier_digits
