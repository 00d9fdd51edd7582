"""Packed, sharded, resumable batches of a corpus, as grain datasets.

A split's documents become one token stream, each document as
`<bos> bytes <eos>`; with `pause_rate` > 0 a `<pause>` is inserted before a
random share of its tokens (pause training: Goyal et al. 2023). The stream is
cut into rows of `seq_len` tokens (packing: no padding in training). Train
rows are shuffled with a fresh permutation each epoch (grain, seeded), split
across hosts by row index and batched; the iterator's state is a small dict
saved in the checkpoint, so a resumed run sees exactly the batches it would
have seen. Every batch is {'tokens': (B, T) int32, 'loss_mask': (B, T) float32}
where loss_mask[b, t] = 0 if token t must not be a target (pad, pause).
"""

from __future__ import annotations

import grain
import numpy as np

from mtp.config import DataConfig
from mtp.data.corpora import DataError, Document, load_documents
from mtp.data.tokenizer import PAD_ID, PAUSE_ID, ByteTokenizer


def token_stream(docs: list[Document], tok: ByteTokenizer) -> np.ndarray:
    """(n,) int32: every document as <bos> bytes <eos>, concatenated."""
    parts = []
    for doc in docs:
        parts += [[tok.bos_id], tok.encode(doc.text), [tok.eos_id]]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def insert_pauses(stream: np.ndarray, rate: float, seed: int) -> np.ndarray:
    """`stream` with a <pause> before each token with probability `rate` (seeded)."""
    if rate <= 0:
        return stream
    before = np.random.default_rng(seed).random(stream.shape[0]) < rate
    out = np.full(stream.shape[0] + before.sum(), PAUSE_ID, np.int32)
    out[np.arange(stream.shape[0]) + np.cumsum(before)] = stream
    return out


def loss_mask(tokens: np.ndarray) -> np.ndarray:
    """1.0 where the token is a real target, 0.0 at pads and pauses."""
    return ((tokens != PAD_ID) & (tokens != PAUSE_ID)).astype(np.float32)


def packed_rows(cfg: DataConfig, tok: ByteTokenizer, split: str) -> np.ndarray:
    """(N, seq_len) int32 rows of the split's stream; the eval tail is padded, not dropped.

    Task corpora ('task:NAME...') are not packed: one example per row (`task_data`).
    """
    if cfg.corpus.startswith("task:"):
        from mtp.data.task_data import task_rows

        return task_rows(cfg, tok, split)
    stream = token_stream(load_documents(cfg, split), tok)
    stream = insert_pauses(stream, cfg.pause_rate, cfg.seed + (split == "eval"))
    t = cfg.seq_len
    if split == "train" and stream.shape[0] < t:
        raise DataError(
            f"data.corpus {cfg.corpus!r}: the train split has {stream.shape[0]} tokens, "
            f"fewer than one row of data.seq_len={t}; add text or lower data.seq_len"
        )
    if split == "eval":
        stream = np.concatenate([stream, np.full(-stream.shape[0] % t, PAD_ID, np.int32)])
    n = stream.shape[0] // t
    return stream[: n * t].reshape(n, t)


def _batch(rows_bt: np.ndarray) -> dict:
    return {"tokens": rows_bt, "loss_mask": loss_mask(rows_bt)}


def train_dataset(
    rows: np.ndarray, cfg: DataConfig, process_index: int = 0, process_count: int = 1
):
    """Infinite grain MapDataset of this host's share of each global batch."""
    if cfg.batch_size % process_count:
        raise DataError(
            f"data.batch_size={cfg.batch_size} must be divisible by the {process_count} hosts"
        )
    ds = grain.MapDataset.range(rows.shape[0]).shuffle(seed=cfg.seed).repeat(None)
    ds = ds[process_index::process_count].map(lambda i: rows[i])
    return ds.batch(cfg.batch_size // process_count).map(_batch)


def train_iterator(
    cfg: DataConfig, tok: ByteTokenizer, process_index: int = 0, process_count: int = 1
):
    """Iterator of training batches with `get_state()` / `set_state(state)` for checkpoints."""
    return iter(train_dataset(packed_rows(cfg, tok, "train"), cfg, process_index, process_count))


def eval_batches(cfg: DataConfig, tok: ByteTokenizer, n: int) -> list[dict]:
    """The first `n` batches of held-out rows, the same every call (fewer if the split is short)."""
    rows = packed_rows(cfg, tok, "eval")
    if rows.shape[0] == 0:
        raise DataError(f"data.corpus {cfg.corpus!r}: the eval split is empty")
    b = cfg.batch_size
    if rows.shape[0] < b:  # pad rows so every batch has the global batch shape
        rows = np.concatenate([rows, np.full((b - rows.shape[0], cfg.seq_len), PAD_ID, np.int32)])
    return [_batch(rows[i : i + b]) for i in range(0, min(n * b, rows.shape[0] - b + 1), b)]
