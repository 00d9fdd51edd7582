"""Digit sums mod m of the first n primes after p, summed mod m.

    prompt  "4 primes>1234, sum of digit sums mod 7?"
    thought "1237:13:6:6 1249:16:2:1 1259:17:3:4 1277:17:3:0"
    answer  "0"

One row per prime, in order: `prime:digit sum:digit sum mod m:running total mod m`.
The answer is the last running total, i.e. the sum of the n digit sums mod m
(a single number, so the answer costs few slow passes). The hard part for a
small model is knowing which numbers are prime; the rows make the rest local.
"""

from __future__ import annotations

import dataclasses
import random
import re

from mtp.data.format import MARKS_LEN
from mtp.data.tasks.base import Example, Task, check_range

_PROMPT = re.compile(r"([0-9]+) primes>([0-9]+), sum of digit sums mod ([0-9]+)\?")


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def primes_after(p: int, n: int) -> list[int]:
    """The first `n` primes strictly greater than `p`."""
    out, q = [], p + 1
    while len(out) < n:
        if is_prime(q):
            out.append(q)
        q += 1
    return out


def digit_sum(n: int) -> int:
    return sum(map(int, str(n)))


def _prompt(count: int, after: int, modulus: int) -> str:
    return f"{count} primes>{after}, sum of digit sums mod {modulus}?"


@dataclasses.dataclass(frozen=True)
class Primes(Task):
    """`count` primes after a random start below `below`, digit sums mod `modulus`."""

    name = "primes"
    count: int = 4
    modulus: int = 7
    below: int = 10_000

    def __post_init__(self):
        check_range(self.name, "count", self.count, 1, 20)
        check_range(self.name, "modulus", self.modulus, 2, 99)
        check_range(self.name, "below", self.below, 1, 10**6)

    def example(self, seed: int) -> Example:
        after = random.Random(seed).randrange(self.below)
        rows, total = [], 0
        for q in primes_after(after, self.count):
            s = digit_sum(q)
            total = (total + s) % self.modulus
            rows.append(f"{q}:{s}:{s % self.modulus}:{total}")
        return Example(_prompt(self.count, after, self.modulus), " ".join(rows), str(total))

    def solve(self, prompt: str) -> str:
        m = _PROMPT.fullmatch(prompt)
        if not m or not 1 <= int(m[1]) <= 1000 or int(m[3]) < 1:
            raise ValueError(f"not a primes prompt: {prompt!r}")
        count, after, modulus = int(m[1]), int(m[2]), int(m[3])
        return str(sum(map(digit_sum, primes_after(after, count))) % modulus)

    @property
    def max_len(self) -> int:
        prime = len(str(primes_after(self.below - 1, self.count)[-1]))
        mod = len(str(self.modulus - 1))
        row = prime + 1 + len(str(9 * prime)) + 1 + mod + 1 + mod
        prompt = len(_prompt(self.count, self.below - 1, self.modulus))
        return prompt + self.count * (row + 1) - 1 + mod + MARKS_LEN
