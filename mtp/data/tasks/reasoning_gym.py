"""reasoning-gym's procedural datasets as mtp tasks: 'rg_basic_arithmetic', 'rg_chain_sum',
'rg_gsm_symbolic'.

    prompt  "State the final answer to the following arithmetic problem: 4 - 1 - 7 ="
    thought "4-1=3 3-7=-4"
    answer  "-4"

Example `seed` is entry 0 of `reasoning_gym.create_dataset(name, seed=seed, size=1,
**difficulty)`: its question is the prompt, its answer the answer. The thought is
gsm_symbolic's worked solution (its `answer_cot` before "#### N"), chain_sum's running
sums left to right, and empty for basic_arithmetic. An entry whose rendered text
(UTF-8 bytes; gsm_symbolic's solutions have a few non-ASCII signs) passes `max_len` is
redrawn from a seed derived from `seed`, so `max_len` is a true bound.

The verifier is reasoning-gym's own `score_answer(answer, entry)`, which needs the entry
and not only the prompt; a word problem cannot be re-solved from its text. So each task
keeps the entries it has drawn in this process, by prompt: every prompt comes from
`example` (which is a pure function of the seed, so any process redraws the same ones),
and `solve` / `score` on a prompt not drawn here raise ValueError. `score` is 1.0 iff
reasoning-gym scores the answer 1.0 (it accepts "+01,000" for 1000 in arithmetic);
`partial_score` is its raw score (partial credit for an answer that contains the truth).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import reasoning_gym

from mtp.data.format import MARKS_LEN, render
from mtp.data.tasks.base import Example, Task, check, check_range

_ENTRIES: dict[Task, dict[str, dict[str, Any]]] = {}  # task -> prompt -> entry drawn here
_REDRAWS = 100


def _subseed(seed: int, attempt: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@dataclasses.dataclass(frozen=True)
class _GymTask(Task):
    """A reasoning-gym dataset; subclasses set `dataset` and map their fields to its config."""

    dataset = ""

    def config(self) -> dict[str, int]:
        """The reasoning-gym config keywords of this difficulty."""
        return {}

    def thought(self, entry: dict[str, Any]) -> str:
        return ""

    def _entry(self, seed: int) -> dict[str, Any]:
        return reasoning_gym.create_dataset(self.dataset, seed=seed, size=1, **self.config())[0]

    def _example(self, entry: dict[str, Any]) -> Example:
        return Example(entry["question"], self.thought(entry), entry["answer"])

    def example(self, seed: int) -> Example:
        for attempt in range(_REDRAWS):
            entry = self._entry(seed if attempt == 0 else _subseed(seed, attempt))
            ex = self._example(entry)
            if len(render(ex).encode()) <= self.max_len and len(ex.answer) <= self.max_answer_len:
                _ENTRIES.setdefault(self, {})[ex.prompt] = entry
                return ex
        check(False, self.name, "difficulty", f"{self.difficulty}: no example fits max_len")

    def _entry_of(self, prompt: str) -> dict[str, Any]:
        entry = _ENTRIES.get(self, {}).get(prompt)
        if entry is None:
            raise ValueError(f"{self.name}: prompt not drawn by this task here: {prompt!r}")
        return entry

    def solve(self, prompt: str) -> str:
        return self._entry_of(prompt)["answer"]

    def partial_score(self, prompt: str, answer: str) -> float:
        entry = self._entry_of(prompt)
        return float(reasoning_gym.get_score_answer_fn(self.dataset)(answer, entry))

    def score(self, prompt: str, answer: str) -> float:
        return float(self.partial_score(prompt, answer) == 1.0)


@dataclasses.dataclass(frozen=True)
class _Terms(_GymTask):
    """The arithmetic datasets: `min_terms..max_terms` numbers of `min_digits..max_digits`."""

    min_terms: int = 2
    max_terms: int = 6
    min_digits: int = 1
    max_digits: int = 4

    def __post_init__(self):
        check_range(self.name, "min_terms", self.min_terms, 2, 8)
        check_range(self.name, "max_terms", self.max_terms, self.min_terms, 8)
        check_range(self.name, "min_digits", self.min_digits, 1, 5)
        check_range(self.name, "max_digits", self.max_digits, self.min_digits, 5)

    def config(self) -> dict[str, int]:
        return self.difficulty


@dataclasses.dataclass(frozen=True)
class BasicArithmetic(_Terms):
    """ "Calculate ( 56 + -33 ) - 84." with + - * and exact /, parentheses and negation."""

    name = "rg_basic_arithmetic"
    dataset = "basic_arithmetic"

    @property
    def max_answer_len(self) -> int:
        return self.max_terms * self.max_digits + 2

    @property
    def max_len(self) -> int:
        # a term: a signed number, an operator, parentheses and a division's extra divisor
        expression = self.max_terms * (3 * self.max_digits + 12) + 6
        return len("Calculate .") + expression + MARKS_LEN + self.max_answer_len


@dataclasses.dataclass(frozen=True)
class ChainSum(_Terms):
    """ "State the final answer to the following arithmetic problem: 57 + 87 + 70 =" (+ and -);
    the thought is the running sum, one `a+b=s` step per term after the first."""

    name = "rg_chain_sum"
    dataset = "chain_sum"

    def thought(self, entry: dict[str, Any]) -> str:
        words = entry["metadata"]["expression"].split()
        acc, steps = int(words[0]), []
        for op, term in zip(words[1::2], words[2::2], strict=True):
            new = acc + int(term) if op == "+" else acc - int(term)
            steps.append(f"{acc}{op}{term}={new}")
            acc = new
        return " ".join(steps)

    @property
    def max_answer_len(self) -> int:
        return self.max_digits + len(str(self.max_terms)) + 1  # |sum| < terms * 10**digits

    @property
    def max_len(self) -> int:
        prompt = len("State the final answer to the following arithmetic problem:  =")
        prompt += self.max_terms * (self.max_digits + 3)
        step = 2 * self.max_answer_len + self.max_digits + 3  # "acc+term=new "
        return prompt + (self.max_terms - 1) * step + MARKS_LEN + self.max_answer_len


@dataclasses.dataclass(frozen=True)
class GsmSymbolic(_GymTask):
    """Grade-school word problems (GSM8K templates with fresh numbers); the thought is the
    template's worked solution. One difficulty only (reasoning-gym supports 1.0)."""

    name = "rg_gsm_symbolic"
    dataset = "gsm_symbolic"

    def thought(self, entry: dict[str, Any]) -> str:
        return entry["metadata"]["answer_cot"].rpartition("####")[0].strip()

    @property
    def max_answer_len(self) -> int:
        return 12

    @property
    def max_len(self) -> int:
        return 1536  # question <= ~650 and solution <= ~680 bytes in 3000 draws; rest redrawn


GYM_TASKS = (BasicArithmetic, ChainSum, GsmSymbolic)
