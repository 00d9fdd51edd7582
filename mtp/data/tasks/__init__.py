"""Verifiable reasoning tasks by name: generator of worked examples + verifier.

    task = make_task("addition", digits=8)
    ex = task.example(seed=0)           # Example(prompt, thought, answer)
    text = mtp.data.format.render(ex)   # prompt<think>thought</think>answer
    reward = task.score(ex.prompt, "123")
    train = task.examples("train", 1000)

See `base.py` for the interface and each task's file for its exact text format.
"""

from __future__ import annotations

import dataclasses

from mtp.config import ConfigError
from mtp.data.tasks.addition import Addition
from mtp.data.tasks.base import SPLITS, Example, Task, split_of
from mtp.data.tasks.lookup import Lookup
from mtp.data.tasks.multiplication import Multiplication
from mtp.data.tasks.parity import Parity
from mtp.data.tasks.primes import Primes
from mtp.data.tasks.reasoning_gym import GYM_TASKS

TASKS: dict[str, type[Task]] = {
    t.name: t for t in (Addition, Multiplication, Primes, Parity, Lookup, *GYM_TASKS)
}


def make_task(name: str, **difficulty: int) -> Task:
    """The task `name` at the given difficulty; ConfigError names what is allowed."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in difficulty:
        if key not in fields:
            raise ConfigError(
                f"task {name!r}: unknown parameter {key!r}; allowed: {', '.join(fields)}"
            )
    return cls(**difficulty)


__all__ = ["SPLITS", "TASKS", "Example", "Task", "make_task", "split_of"]
