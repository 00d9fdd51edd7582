"""Sections `data` (corpus, batching) and `train` (the supervised loop)."""

from __future__ import annotations

import dataclasses

from mtp.config.fields import check, from_dict


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Text corpus and batching. `corpus`: 'stdlib' (the bundled default: this
    Python's standard-library source), 'files:PATH_OR_GLOB' (local text files),
    'tfds:NAME[/CONFIG]:SPLIT[:FEATURE]' (a prepared tfds dataset, see data_dir) or
    'task:NAME[:key=value,...]' (worked task examples, one per row: `data.task_data`)."""

    corpus: str = "stdlib"
    seq_len: int = 256  # tokens per training row
    batch_size: int = 16  # global batch, split over hosts and devices
    seed: int = 0
    eval_fraction: float = 0.05  # share of documents held out for evaluation
    data_dir: str = ""  # tfds data_dir ('' = tfds default)
    max_bytes: int = 0  # cap on corpus bytes read (0 = all)
    pause_rate: float = 0.0  # chance per position of inserting a <pause> (pause training)
    pauses: int = 0  # task corpora: M ~ U{0..pauses} <pause>s before each answer
    pause_targets: bool = False  # task corpora: those pauses are targets (learned pausing)
    prompt_targets: bool = True  # task corpora: False masks the prompt's own targets

    def __post_init__(self):
        check(self.seq_len >= 2, "data.seq_len", f"must be >= 2, got {self.seq_len}")
        check(self.batch_size >= 1, "data.batch_size", f"must be >= 1, got {self.batch_size}")
        check(
            0.0 < self.eval_fraction < 1.0,
            "data.eval_fraction",
            f"must be in (0, 1), got {self.eval_fraction}",
        )
        check(self.max_bytes >= 0, "data.max_bytes", f"must be >= 0, got {self.max_bytes}")
        check(
            0.0 <= self.pause_rate < 1.0,
            "data.pause_rate",
            f"must be in [0, 1), got {self.pause_rate}",
        )
        check(self.pauses >= 0, "data.pauses", f"must be >= 0, got {self.pauses}")
        kinds = ("stdlib", "files:", "tfds:", "task:")
        check(
            self.corpus == "stdlib" or self.corpus.startswith(kinds[1:]),
            "data.corpus",
            f"{self.corpus!r} is not one of 'stdlib', 'files:PATH_OR_GLOB', 'tfds:NAME:SPLIT', "
            "'task:NAME[:key=value,...]'",
        )


def data_config(config) -> DataConfig:
    return from_dict(DataConfig, "data", config.data)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule, loss weights and cadence of the supervised loop."""

    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    draft_weight: float = 1.0  # drafter loss weight against the main loss
    draft_decay: float = 0.8  # geometric per-offset weights 1, d, d^2, ... (normalised)
    distill_weight: float = 0.0  # drafter onto the main model's own distribution
    log_every: int = 20
    eval_every: int = 200
    eval_batches: int = 8
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    sharding: str = "replicate"  # parameters: 'replicate' or 'fsdp' (sharded over devices)

    def __post_init__(self):
        for name in ("steps", "log_every", "eval_every", "eval_batches", "checkpoint_every"):
            check(
                getattr(self, name) >= 1,
                f"train.{name}",
                f"must be >= 1, got {getattr(self, name)}",
            )
        check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        check(
            self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        )
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        check(
            0 < self.draft_decay <= 1,
            "train.draft_decay",
            f"must be in (0, 1], got {self.draft_decay}",
        )
        check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        check(
            self.sharding in ("replicate", "fsdp"),
            "train.sharding",
            f"{self.sharding!r} not in ('replicate', 'fsdp')",
        )


def train_config(config) -> TrainConfig:
    return from_dict(TrainConfig, "train", config.train)
