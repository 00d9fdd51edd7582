"""Token rows as a tfds dataset (ArrayRecord): data a model wrote, stored once, read back.

One builder, `mtp_rows`, whose config name identifies what made the rows
(e.g. the self-distillation spec and model). Each record is one training row:
`tokens` (T,) int32 and `loss_mask` (T,) float32. No TensorFlow is needed:
prepared from Python, read with `tfds.data_source`.
"""

from __future__ import annotations

import dataclasses

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
