"""Task examples as training rows: the corpus kind 'task:NAME[:key=value,...]'.

    data.corpus = "task:addition:digits=4,n=20000"

Each example is one row, `<bos> prompt <think> thought </think> answer <eos>`
(`mtp.data.tasks.render`, specials as their own ids), padded with PAD to
`data.seq_len`; pads are never targets (`pipeline.loss_mask`), so no row holds
two problems. The keys are the task's difficulty fields plus `n`, the number of
train examples (default 20000); eval gets `max(64, n * eval_fraction)`
examples from the task's eval split, which no train problem can fall into
(`mtp.data.tasks.split_of`). The same spec string, without the 'task:' prefix,
names the task of an RL run (`rl.task`).
"""

from __future__ import annotations

import numpy as np

from mtp.config import ConfigError, DataConfig
from mtp.data.corpora import DataError
from mtp.data.tasks import Task, make_task, render
from mtp.data.tokenizer import PAD_ID, ByteTokenizer

DEFAULT_N = 20_000


def parse_task_spec(spec: str) -> tuple[Task, int]:
    """'NAME[:key=value,...]' -> (task, n). ConfigError names the bad part."""
    name, _, args = spec.partition(":")
    kwargs, n = {}, DEFAULT_N
    for part in filter(None, args.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"task spec {spec!r}: expected key=integer, got {part!r}")
        if key.strip() == "n":
            n = int(value)
        else:
            kwargs[key.strip()] = int(value)
    if n < 1:
        raise ConfigError(f"task spec {spec!r}: n must be >= 1, got {n}")
    return make_task(name, **kwargs), n


def encode_example(tok: ByteTokenizer, text: str) -> np.ndarray:
    """(n,) int32: <bos> text <eos>, with "<think>" etc. as their special ids."""
    return np.concatenate([[tok.bos_id], tok.encode_with_specials(text), [tok.eos_id]]).astype(
        np.int32
    )


def task_rows(cfg: DataConfig, tok: ByteTokenizer, split: str) -> np.ndarray:
    """(N, seq_len) int32: one rendered example per row, PAD after its <eos>."""
    task, n = parse_task_spec(cfg.corpus.removeprefix("task:"))
    if split == "eval":
        n = max(64, round(n * cfg.eval_fraction))
    examples = task.examples(split, n, start=0)
    rows = np.full((n, cfg.seq_len), PAD_ID, np.int32)
    for i, ex in enumerate(examples):
        ids = encode_example(tok, render(ex))
        if ids.size > cfg.seq_len:
            raise DataError(
                f"data.corpus {cfg.corpus!r}: example {i} of {split} has {ids.size} tokens, "
                f"more than data.seq_len={cfg.seq_len}; raise data.seq_len to at least "
                f"{task.max_len + 2} or lower the difficulty"
            )
        rows[i, : ids.size] = ids
    return rows
