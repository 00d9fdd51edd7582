"""The task interface: a seeded generator of worked examples plus a verifier.

A task is a frozen dataclass whose fields are its difficulty. `example(seed)`
draws one `Example(prompt, thought, answer)`, deterministic by seed; `score`
re-derives the truth from the prompt alone, so the same object serves
supervised data, RL rewards and evaluation.

Training text (`mtp.data.format.render`) is `prompt + "<think>" + thought + "</think>" + answer`;
the model then emits "<eos>". Texts are ASCII, so characters are bytes; the
tokenizer reads each special string as one token, so `len(render(ex))` (and
`task.max_len`) bound the token count.

Train and eval are split by a hash of the prompt (not of the seed), so no eval
problem ever appears in training, even where the problem space is small.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import itertools
from typing import ClassVar, Literal

from mtp.config import ConfigError

SPLITS = ("train", "eval")
EVAL_PERCENT = 10  # share of the problem space held out for evaluation
Split = Literal["train", "eval"]


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    thought: str
    answer: str


def split_of(prompt: str) -> Split:
    """Which split a problem belongs to: a stable hash class of its prompt."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return "eval" if h % 100 < EVAL_PERCENT else "train"


def _seed(split: str, index: int, attempt: int) -> int:
    return int.from_bytes(
        hashlib.blake2b(f"{split}/{index}/{attempt}".encode(), digest_size=8).digest(), "little"
    )


def check(ok: bool, task: str, field: str, msg: str) -> None:
    """Raises ConfigError naming the task's difficulty field unless `ok`."""
    if not ok:
        raise ConfigError(f"task {task!r}: {field} {msg}")


def check_range(task: str, field: str, value: int, lo: int, hi: int) -> None:
    check(lo <= value <= hi, task, field, f"must be in {lo}..{hi}, got {value}")


@dataclasses.dataclass(frozen=True)
class Task(abc.ABC):
    """Base of all tasks; subclasses add difficulty fields and set `name`."""

    name: ClassVar[str]

    @abc.abstractmethod
    def example(self, seed: int) -> Example:
        """One worked example, a pure function of `seed` and the difficulty."""

    @abc.abstractmethod
    def solve(self, prompt: str) -> str:
        """The true answer, parsed and computed from the prompt alone.

        Raises ValueError if `prompt` is not a prompt of this task.
        """

    @property
    @abc.abstractmethod
    def max_len(self) -> int:
        """Upper bound on `len(render(example))` at this difficulty."""

    @property
    def max_answer_len(self) -> int:
        """Upper bound on `len(example.answer)`: what a decode must allow after the thought."""
        return self.max_len

    @property
    def difficulty(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def score(self, prompt: str, answer: str) -> float:
        """Reward in [0, 1]: 1.0 iff `answer` is exactly the true answer.

        Never raises on a malformed answer (it scores 0); a prompt that is not
        this task's raises ValueError, since that is a bug, not a bad answer.
        """
        return float(answer == self.solve(prompt))

    def partial_score(self, prompt: str, answer: str) -> float:
        """Partial credit in [0, 1]: the share of the true answer's characters that `answer`
        has at the same place counted from the end (units digit first for numbers), over the
        longer of the two; 1.0 iff exact. A dense RL reward where few answers are exact."""
        truth = self.solve(prompt)
        same = sum(a == b for a, b in zip(reversed(answer), reversed(truth), strict=False))
        return same / max(len(truth), len(answer))

    def examples(self, split: Split, n: int, start: int = 0) -> list[Example]:
        """Examples `start .. start + n - 1` of `split`, deterministic.

        Example i is the first of a fixed sequence of seeds whose prompt hashes
        into `split` (`split_of`), so any range can be read without the ones before.
        """
        check(split in SPLITS, self.name, "split", f"{split!r} not in {SPLITS}")
        out = []
        for i in range(start, start + n):
            for attempt in itertools.count():
                ex = self.example(_seed(split, i, attempt))
                if split_of(ex.prompt) == split:
                    out.append(ex)
                    break
                check(
                    attempt < 1000,
                    self.name,
                    "difficulty",
                    f"{self.difficulty} leaves too few problems for a {split} split",
                )
        return out
