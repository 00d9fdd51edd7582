"""Metric writers (CSV, JSONL, TensorBoard) and the progress bar.

Only process 0 writes. Each kind of record ('train', 'eval', 'rl', ...) gets
its own CSV (`WORKDIR/metrics/KIND.csv`, columns fixed by the first row) and
all go to one JSONL and to TensorBoard under `KIND/name`. Files are appended
to, so a resumed run continues its curves.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import jax
import numpy as np

from mtp.config import UserError


def is_main_process() -> bool:
    return jax.process_index() == 0


class MetricWriter:
    def __init__(self, workdir, tensorboard: bool = True):
        self.enabled = is_main_process()
        self.dir = Path(workdir) / "metrics"
        self._tb = None
        if self.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, kind: str, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)} | {k: float(np.asarray(v)) for k, v in scalars.items()}
        path = self.dir / f"{kind}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            if new:
                fields = list(row)
            else:
                with path.open() as r:
                    fields = next(csv.reader(r))
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        with (self.dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time()} | row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_csv(workdir, kind: str) -> list[dict]:
    """Rows of WORKDIR/metrics/KIND.csv as dicts of floats, one per step in step order.

    A run killed between checkpoints re-logs the steps it trains again after
    resuming; the last row written for a step wins.
    """
    path = Path(workdir) / "metrics" / f"{kind}.csv"
    if not path.exists():
        return []
    with path.open() as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return sorted({r["step"]: r for r in rows}.values(), key=lambda r: r["step"])


def compare_runs(workdirs: list[str]) -> str:
    """Final evaluations of run directories side by side: a metric per row, a run per column."""
    reports = []
    for w in workdirs:
        path = Path(w) / "eval_report.json"
        if not path.exists():
            raise UserError(f"{w}: no eval_report.json yet; the run has not finished")
        reports.append(json.loads(path.read_text()))
    names = list(dict.fromkeys(k for r in reports for k in r))
    rows = [[n] + [r.get(n, "") for r in reports] for n in names]
    return format_table(rows, ["metric", *workdirs])


def progress(total: int, initial: int = 0, desc: str = "train"):
    """tqdm bar on process 0 (a widget in notebooks), a no-op elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        disable=not is_main_process(),
        dynamic_ncols=True,
        mininterval=1.0,
    )


def format_table(rows: list[list], header: list[str]) -> str:
    """A Markdown table (readable in a terminal, pasteable into docs)."""

    def cell(v):
        if isinstance(v, float):
            return "-" if v != v else f"{v:.4g}"  # NaN: not applicable
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
