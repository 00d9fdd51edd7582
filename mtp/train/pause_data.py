"""Task rows with M `<pause>` tokens before the answer (pause fine-tuning, Goyal et al. 2023).

A row is `<bos> prompt <think> thought </think> <pause>*M answer <eos>`, PAD
after it, with M drawn per example from U{0..max_pauses} (seeded; 0 gives the
plain rows of `mtp.data.task_data`). The loss mask is the pipeline's
(`pipeline.loss_mask`: 0 at pads and pauses, so no pause is ever a target)
and, in addition, 0 on the prompt: its letters are random, and the only
thing to learn is what follows it. With `emit=True` the appended pauses *are*
targets: the model then learns to emit `<pause>` itself, with the hazard of
the M distribution — the starting point of learned pausing (`pause_rl`).
"""

from __future__ import annotations

import numpy as np

from mtp.data.corpora import DataError
from mtp.data.pipeline import loss_mask
from mtp.data.task_data import encode_example
from mtp.data.tasks import Task
from mtp.data.tokenizer import PAD_ID, PAUSE_ID, THINK_OPEN_ID, ByteTokenizer


def prompt_head(tok: ByteTokenizer, prompt: str, thought: str = "") -> np.ndarray:
    """(n,) int32: <bos> prompt <think> thought </think>, what precedes the pauses."""
    return encode_example(tok, f"{prompt}<think>{thought}</think>")[:-1]


def with_pauses(head: np.ndarray, m: int) -> np.ndarray:
    """`head` followed by m pauses: the prompt of a fixed-M decode."""
    return np.concatenate([head, np.full(m, PAUSE_ID, np.int32)]).astype(np.int32)


def pause_rows(
    task: Task,
    split: str,
    n: int,
    seq_len: int,
    *,
    max_pauses: int,
    seed: int = 0,
    emit: bool = False,
    tok: ByteTokenizer | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(rows (n, seq_len) int32, loss_mask (n, seq_len) float32) of `split`'s first n examples."""
    tok = tok or ByteTokenizer()
    rng = np.random.default_rng(seed)
    ms = rng.integers(0, max_pauses + 1, n)
    rows = np.full((n, seq_len), PAD_ID, np.int32)
    emit_mask = np.zeros((n, seq_len), bool)
    for i, ex in enumerate(task.examples(split, n)):
        head = prompt_head(tok, ex.prompt, ex.thought)
        tail = np.concatenate([tok.encode(ex.answer), [tok.eos_id]])
        ids = np.concatenate([with_pauses(head, int(ms[i])), tail])
        if ids.size > seq_len:
            raise DataError(
                f"pause rows: example {i} of {split} has {ids.size} tokens with {ms[i]} pauses, "
                f"more than seq_len={seq_len}; raise it to at least "
                f"{task.max_len + 2 + max_pauses}"
            )
        rows[i, : ids.size] = ids
        emit_mask[i, head.size : head.size + ms[i]] = True
    mask = loss_mask(rows)
    # targets before <think> are the prompt's random letters: not learnable, not trained
    open_at = np.argmax(rows == THINK_OPEN_ID, axis=1)
    mask[np.arange(seq_len)[None, :] < open_at[:, None]] = 0.0
    if emit:
        mask[emit_mask] = 1.0
    return rows, mask
