"""Multi-hop lookup, answered with no written thought (for pause-token runs).

    prompt  "qk ad kf ... fq: 4 hops from a?"
    thought ""
    answer  "q"

The prompt lists a random map over `symbols` letters as pairs `xy` ("x goes
to y") in shuffled order; the answer is where `hops` steps from the start land.
The map is one cycle through all its letters, so no hop count below `symbols`
ends early or loops back. The thought is empty by design: extra passes
(`<pause>` tokens, Pfau et al. 2024, "Let's think dot by dot") are the only
extra compute, so accuracy against pauses measures what they buy.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string

from mtp.data.format import render
from mtp.data.tasks.base import Example, Task, check_range

_PROMPT = re.compile(r"((?:[a-z]{2} )*[a-z]{2}): ([0-9]+) hops from ([a-z])\?")


def follow(pairs: str, start: str, hops: int) -> str:
    """Where `hops` steps of the map `pairs` ("ab cd ...") lead from `start`."""
    step = {p[0]: p[1] for p in pairs.split()}
    if len(step) != len(pairs.split()):
        raise ValueError(f"a letter is mapped twice in {pairs!r}")
    at = start
    for _ in range(hops):
        at = step[at]
    return at


@dataclasses.dataclass(frozen=True)
class Lookup(Task):
    """Follow a random `symbols`-letter cycle for `hops` steps; empty thought."""

    name = "lookup"
    symbols: int = 16
    hops: int = 4

    def __post_init__(self):
        check_range(self.name, "symbols", self.symbols, 2, 26)
        check_range(self.name, "hops", self.hops, 1, self.symbols - 1)

    def example(self, seed: int) -> Example:
        rng = random.Random(seed)
        cycle = rng.sample(string.ascii_lowercase, self.symbols)
        pairs = [x + y for x, y in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
        rng.shuffle(pairs)
        start = rng.choice(cycle)
        prompt = f"{' '.join(pairs)}: {self.hops} hops from {start}?"
        return Example(prompt, "", follow(" ".join(pairs), start, self.hops))

    def solve(self, prompt: str) -> str:
        m = _PROMPT.fullmatch(prompt)
        if not m:
            raise ValueError(f"not a lookup prompt: {prompt!r}")
        try:
            return follow(m[1], m[3], int(m[2]))
        except KeyError as e:
            raise ValueError(f"lookup prompt leaves the map at {e}: {prompt!r}") from None

    @property
    def max_len(self) -> int:
        return len(render(self.example(0)))  # every text is this long

    @property
    def max_answer_len(self) -> int:
        return 1
