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
from mtp.data.format import insert_pauses, loss_mask
from mtp.data.task_data import task_rows
from mtp.data.tokenizer import Tokenizer


def token_stream(docs: list[Document], tok: Tokenizer) -> np.ndarray:
    """(n,) int32: every document as <bos> text <eos>, concatenated."""
    s = tok.specials
    parts = []
    for doc in docs:
        parts += [[s.bos], tok.encode(doc.text), [s.eos]]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def packed_rows(cfg: DataConfig, tok: Tokenizer, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(rows, loss_mask), both (N, seq_len), of the split; the eval tail is padded, not dropped.

    Task corpora ('task:NAME...') are not packed: one example per row (`task_data`).
    """
    if cfg.corpus.startswith("task:"):
        return task_rows(cfg, tok, split)
    if cfg.corpus.startswith("distill:"):
        raise DataError(
            f"data.corpus {cfg.corpus!r}: self-distillation rows are written by a model "
            "(mtp.train.self_distill), not read from a corpus"
        )
    stream = token_stream(load_documents(cfg, split), tok)
    stream = insert_pauses(tok, stream, cfg.pause_rate, cfg.seed + (split == "eval"))
    t = cfg.seq_len
    if split == "train" and stream.shape[0] < t:
        raise DataError(
            f"data.corpus {cfg.corpus!r}: the train split has {stream.shape[0]} tokens, "
            f"fewer than one row of data.seq_len={t}; add text or lower data.seq_len"
        )
    if split == "eval":
        stream = np.concatenate([stream, np.full(-stream.shape[0] % t, tok.specials.pad, np.int32)])
    n = stream.shape[0] // t
    rows = stream[: n * t].reshape(n, t)
    return rows, loss_mask(tok, rows)


Arrays = dict[str, np.ndarray]  # 'tokens', 'loss_mask' (N, T) and optional extras (N, ...)


def split_arrays(cfg: DataConfig, tok: Tokenizer, split: str) -> Arrays:
    """The rows of a split as named arrays, one row per index."""
    rows, mask = packed_rows(cfg, tok, split)
    return {"tokens": rows, "loss_mask": mask}


def train_dataset(arrays: Arrays, cfg: DataConfig, process_index: int = 0, process_count: int = 1):
    """Infinite grain MapDataset of this host's share of each global batch."""
    if cfg.batch_size % process_count:
        raise DataError(
            f"data.batch_size={cfg.batch_size} must be divisible by the {process_count} hosts"
        )
    n = arrays["tokens"].shape[0]
    ds = grain.MapDataset.range(n).shuffle(seed=cfg.seed).repeat(None)
    ds = ds[process_index::process_count].map(lambda i: {k: a[i] for k, a in arrays.items()})
    return ds.batch(cfg.batch_size // process_count)


def train_iterator(
    cfg: DataConfig,
    tok: Tokenizer,
    process_index: int = 0,
    process_count: int = 1,
    arrays: Arrays | None = None,
):
    """Iterator of training batches with `get_state()` / `set_state(state)` for checkpoints;
    `arrays` (default: the corpus's train rows) are rows prepared elsewhere."""
    arrays = split_arrays(cfg, tok, "train") if arrays is None else arrays
    return iter(train_dataset(arrays, cfg, process_index, process_count))


def eval_batches(cfg: DataConfig, tok: Tokenizer, n: int, arrays: Arrays | None = None) -> list:
    """The first `n` batches of held-out rows, the same every call (fewer if the split is short);
    `arrays` as in `train_iterator`."""
    arrays = split_arrays(cfg, tok, "eval") if arrays is None else arrays
    rows = arrays["tokens"].shape[0]
    if rows == 0:
        raise DataError(f"data.corpus {cfg.corpus!r}: the eval split is empty")
    b = cfg.batch_size
    if rows < b:  # pad rows so every batch has the global batch shape (pads are no targets)
        fill = {"tokens": tok.specials.pad}
        arrays = {
            k: np.concatenate([a, np.full((b - rows, *a.shape[1:]), fill.get(k, 0), a.dtype)])
            for k, a in arrays.items()
        }
        rows = b
    return [
        {k: a[i : i + b] for k, a in arrays.items()} for i in range(0, min(n * b, rows - b + 1), b)
    ]
