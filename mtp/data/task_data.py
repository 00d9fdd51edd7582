"""Task examples as training rows: the corpus kind 'task:NAME[:key=value,...]'.

    data.corpus = "task:addition:digits=4,n=20000"

Each example is one row, `<bos> prompt <think> thought </think> answer <eos>`
(`mtp.data.format.render`, specials as their own ids), padded with pad to
`data.seq_len`; pads are never targets (`pipeline.loss_mask`), so no row holds
two problems. The keys are the task's difficulty fields plus `n`, the number of
train examples (default 20000); eval gets `max(64, n * eval_fraction)`
examples from the task's eval split, which no train problem can fall into
(`mtp.data.tasks.split_of`). The same spec string, without the 'task:' prefix,
names the task of an RL run (`rl.task`).
"""

from __future__ import annotations

import numpy as np

from mtp.config import DataConfig, Run
from mtp.data.corpora import DataError
from mtp.data.format import MARKS_LEN, encode_prompt, encode_text, loss_mask, with_pauses
from mtp.data.tasks import Task, make_task
from mtp.data.tokenizer import Tokenizer
from mtp.errors import ConfigError

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


def check_tasks(run: Run) -> None:
    """The checks of a run that need its tasks: every task spec parses, and a pause run's
    prompts with their pauses and answer fit the model. ConfigError names the field."""
    distill = run.data.corpus.startswith("distill:")
    for field, spec in (
        ("data.corpus", distill and run.data.corpus.removeprefix("distill:")),
        ("data.teacher_forced", run.data.teacher_forced),
        ("rl.task", run.rl and run.rl.task),
        ("pause.task", run.pause and run.pause.task),
    ):
        if spec:
            try:
                parse_task_spec(spec)
            except ConfigError as e:
                raise ConfigError(f"config.{field}: {e}") from None
    if run.pause is not None:
        pause = run.pause
        task, _ = parse_task_spec(pause.task)
        answer = task.max_answer_len + 1  # + <eos>
        # <bos> prompt <think> thought </think>: the marks are one token each
        head = 1 + task.max_len - MARKS_LEN - task.max_answer_len + 2
        need = head + max(max(pause.eval_ms, default=0), pause.cap) + answer
        if run.model.max_len < need:
            raise ConfigError(
                f"config.model.max_len: must be >= {need} for pause.task's prompts with "
                f"max(pause.eval_ms) pauses or pause.cap={pause.cap} pauses before the answer, "
                f"got {run.model.max_len}"
            )


def task_rows(cfg: DataConfig, tok: Tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, loss_mask), both (N, seq_len): one example per row, pad after its <eos>.

    With `data.pauses` = P > 0, M ~ U{0..P} pauses (seeded per example) sit between the
    thought and the answer, masked as targets unless `data.pause_targets` (then the model
    learns to emit them); `data.prompt_targets=False` masks the prompt's own targets.
    """
    task, n = parse_task_spec(cfg.corpus.removeprefix("task:"))
    if split == "eval":
        n = max(64, round(n * cfg.eval_fraction))
    ms = np.random.default_rng(cfg.seed + (split == "eval")).integers(0, cfg.pauses + 1, n)
    rows = np.full((n, cfg.seq_len), tok.specials.pad, np.int32)
    starts, ends = np.zeros(n, np.int64), np.zeros(n, np.int64)  # pauses, per row
    for i, ex in enumerate(task.examples(split, n, start=0)):
        head = encode_prompt(tok, ex.prompt, ex.thought)
        tail = encode_text(tok, ex.answer)[1:]  # answer <eos>
        ids = np.concatenate([with_pauses(tok, head, int(ms[i])), tail])
        if ids.size > cfg.seq_len:
            raise DataError(
                f"data.corpus {cfg.corpus!r}: example {i} of {split} has {ids.size} tokens, "
                f"more than data.seq_len={cfg.seq_len}; raise data.seq_len to at least "
                f"{task.max_len + 2 + cfg.pauses} or lower the difficulty"
            )
        rows[i, : ids.size] = ids
        starts[i], ends[i] = head.size, head.size + ms[i]
    mask = loss_mask(tok, rows)
    t_t = np.arange(cfg.seq_len)
    if not cfg.prompt_targets:  # targets before <think>: the prompt itself
        open_n = np.argmax(rows == tok.specials.think_open, axis=1)
        mask[t_t[None, :] < open_n[:, None]] = 0.0
    if cfg.pause_targets:
        mask[(t_t[None, :] >= starts[:, None]) & (t_t[None, :] < ends[:, None])] = 1.0
    return rows, mask
