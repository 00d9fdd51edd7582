"""Multi-digit addition with the carry chain written out, least significant first.

    prompt  "4821+9375="
    thought "1+5+0=06 2+7+0=09 8+3+0=11 4+9+1=14"
    answer  "14196"

One step per column, units first: `a+b+c=cs` with `a`, `b` the operands' digits
(the shorter operand padded with 0), `c` the carry in (the tens digit of the
previous step, 0 at first) and `cs` their sum as two digits: carry out, then
the sum's digit. Every step has the same width, so a byte-level model finds
each column by position. The answer is the sum in decimal.

With `thought=0` the thought is empty: the model must answer "14196" straight
after "4821+9375=", every carry computed inside the forward pass (the
pause-token task: extra passes without extra written thought).
"""

from __future__ import annotations

import dataclasses
import random
import re

from mtp.data.format import render
from mtp.data.tasks.base import Example, Task, check_range

_PROMPT = re.compile(r"([0-9]+)\+([0-9]+)=")


def carry_steps(a: int, b: int) -> list[tuple[int, int, int, int]]:
    """(digit of a, digit of b, carry in, column sum) per column, units first."""
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        steps.append((x, y, carry, x + y + carry))
        carry = (x + y + carry) // 10
    return steps


def draw(rng: random.Random, digits: int) -> int:
    """A uniform number with exactly `digits` digits (0..9 for one digit)."""
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _worked(a: int, b: int, written: bool = True) -> Example:
    steps = carry_steps(a, b) if written else []
    thought = " ".join(f"{x}+{y}+{c}={s:02d}" for x, y, c, s in steps)
    return Example(f"{a}+{b}=", thought, str(a + b))


@dataclasses.dataclass(frozen=True)
class Addition(Task):
    """Sum of two random `digits`-digit numbers; `thought` 1 writes the carry chain, 0 not."""

    name = "addition"
    digits: int = 6
    thought: int = 1

    def __post_init__(self):
        check_range(self.name, "digits", self.digits, 1, 32)
        check_range(self.name, "thought", self.thought, 0, 1)

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        return _worked(draw(rng, self.digits), draw(rng, self.digits), bool(self.thought))

    def solve(self, prompt: str) -> str:
        m = _PROMPT.fullmatch(prompt)
        if not m:
            raise ValueError(f"not an addition prompt: {prompt!r}")
        return str(int(m[1]) + int(m[2]))

    @property
    def max_len(self) -> int:
        nines = 10**self.digits - 1  # the longest sum; every step has the same width
        return len(render(_worked(nines, nines, bool(self.thought))))

    @property
    def max_answer_len(self) -> int:
        return self.digits + 1
