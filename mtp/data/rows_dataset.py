"""Token rows as a tfds dataset (ArrayRecord): data a model wrote, stored once, read back.

One builder, `mtp_rows`, whose config name identifies what made the rows
(e.g. the self-distillation spec and model). Each record is one training row:
`tokens` (T,) int32 and `loss_mask` (T,) float32. No TensorFlow is needed:
prepared from Python, read with `tfds.data_source`.

Beside a split's rows, the model's taps over them (`write_taps`: an .npz holding only each
row's span of positions that is read) when they were kept while the rows were written.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds

from mtp.errors import DataError

SPLITS = ("train", "eval")


@dataclasses.dataclass(kw_only=True)
class RowsConfig(tfds.core.BuilderConfig):
    seq_len: int = 256


class MtpRows(tfds.core.GeneratorBasedBuilder):
    """Training rows (tokens, loss mask) of one generated dataset."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing to download: no checksums file to look for

    def __init__(self, *, rows: dict | None = None, **kwargs):
        self._rows = rows
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        t = self.builder_config.seq_len
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(t,), dtype=np.int32),
                    "loss_mask": tfds.features.Tensor(shape=(t,), dtype=np.float32),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
        rows, mask = self._rows[split]
        for i in range(rows.shape[0]):
            yield i, {"tokens": rows[i], "loss_mask": mask[i]}


def _builder(name: str, data_dir, seq_len: int, rows=None) -> MtpRows:
    config = RowsConfig(name=name, version="1.0.0", seq_len=seq_len)
    return MtpRows(config=config, data_dir=str(data_dir), file_format="array_record", rows=rows)


def is_prepared(name: str, data_dir, seq_len: int) -> bool:
    return _builder(name, data_dir, seq_len).is_prepared()


def write_rows(name: str, data_dir, rows: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Stores `{split: (tokens (N, T), loss_mask (N, T))}` under data_dir (atomically: tfds
    writes to a temporary directory and renames)."""
    seq_len = rows["train"][0].shape[1]
    _builder(name, data_dir, seq_len, rows).download_and_prepare()


def read_rows(name: str, data_dir, seq_len: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens (N, T), loss_mask (N, T)) of a split stored by `write_rows`."""
    builder = _builder(name, data_dir, seq_len)
    if not builder.is_prepared():
        raise DataError(f"no rows dataset {name!r} under {data_dir}; it is written by its program")
    source = builder.as_data_source()[split]
    records = [source[i] for i in range(len(source))]
    return (
        np.stack([r["tokens"] for r in records]).astype(np.int32),
        np.stack([r["loss_mask"] for r in records]).astype(np.float32),
    )


def _taps_path(name: str, data_dir, split: str) -> Path:
    return Path(data_dir) / "taps" / f"{name}-{split}.npz"


def write_taps(name: str, data_dir, split: str, taps, spans) -> None:
    """Stores a split's taps (N, T, L, D) at each row's positions spans (N, 2) [lo, hi),
    the rest not (float32 on disk; atomically: a temporary file renamed). Written before the
    rows, so that rows found prepared have their taps beside them if they were kept."""
    path = _taps_path(name, data_dir, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = np.concatenate([taps[i, lo:hi] for i, (lo, hi) in enumerate(spans)])
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f, taps=flat.astype(np.float32), spans=np.asarray(spans), shape=np.array(taps.shape),
            dtype=np.array(str(taps.dtype)),
        )  # fmt: skip
    os.replace(tmp, path)


def read_taps(name: str, data_dir, split: str) -> np.ndarray | None:
    """The taps (N, T, L, D) `write_taps` stored, zeros outside the spans; None if none were."""
    path = _taps_path(name, data_dir, split)
    if not path.exists():
        return None
    with np.load(path) as f:
        out = np.zeros(tuple(f["shape"]), jnp.dtype(str(f["dtype"])))
        flat, at = f["taps"], 0
        for i, (lo, hi) in enumerate(f["spans"]):
            out[i, lo:hi], at = flat[at : at + hi - lo], at + hi - lo
    return out
