"""Summary of a sweep: one row per member, a CSV and a Markdown table, and PNG plots.

    python -m mtp.run --workdir=runs/sweep_k --mode=report     # collect(workdir)

Reads WORKDIR/sweep.json and, per member, eval_report.json (drafter accuracy
and agreement per offset, the accepted length they imply), metrics/train.csv
(training tokens/s, median over the logged intervals) and speedup.json
(measured slow vs speculative decoding). Members not finished yet appear with
empty cells. Writes WORKDIR/sweep_summary.{csv,md} and WORKDIR/plots/:

    draft_accuracy.png   drafter top-1 accuracy per offset j, a line per member
    accepted_length.png  mean accepted drafts per pass against k (implied and measured)
    speedup.png          speculative tokens/s over slow tokens/s against k
    tokens_per_s.png     training and decoding tokens/s against k
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from mtp.config import UserError
from mtp.metrics import format_table, is_main_process, read_csv

PLOTS = ("draft_accuracy", "accepted_length", "speedup", "tokens_per_s")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def load_rows(workdir) -> list[dict]:
    """One dict per member in sweep order: name, k, kind, finished, then its metrics."""
    workdir = Path(workdir)
    manifest = workdir / "sweep.json"
    if not manifest.exists():
        raise UserError(f"{workdir}: not a sweep directory (no sweep.json); run a sweep there")
    rows = []
    for m in json.loads(manifest.read_text())["members"]:
        run_dir = workdir / m["name"]
        report = _read_json(run_dir / "eval_report.json")
        row = {"name": m["name"], "k": m["k"], "kind": m["kind"], "finished": bool(report)}
        row |= report
        tok_s = [r["tokens_per_s"] for r in read_csv(run_dir, "train") if "tokens_per_s" in r]
        if tok_s:
            row["train_tokens_per_s"] = float(np.median(tok_s))
        row |= _read_json(run_dir / "speedup.json")
        row.pop("prompts", None), row.pop("prompt_len", None)
        rows.append(row)
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    fields = list(dict.fromkeys(key for r in rows for key in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def markdown(rows: list[dict]) -> str:
    """The headline columns; every metric is in the CSV."""
    ks = sorted({r["k"] for r in rows})
    offsets = [j for j in sorted({1, *ks}) if j <= max(ks)]
    cols = [
        ("member", "name"),
        ("k", "k"),
        ("drafter", "kind"),
        ("step", "step"),
        ("main loss", "main_loss"),
        *[(f"acc @{j}", f"acc_draft_{j}") for j in offsets],
        ("accepted (implied)", "accepted_len"),
        ("accepted (measured)", "spec_mean_accepted"),
        ("train tok/s", "train_tokens_per_s"),
        ("slow tok/s", "slow_tokens_per_s"),
        ("spec. tok/s", "spec_tokens_per_s"),
        ("speedup", "speedup"),
        ("= slow", "identical"),
    ]

    def cell(r, key):
        v = r.get(key, "")
        if v == "":
            return "-"
        if key == "identical":
            return "yes" if v else "NO"
        if isinstance(v, float):
            return f"{v:.0f}" if "tokens_per_s" in key else f"{v:.3f}"
        return v

    return format_table([[cell(r, key) for _, key in cols] for r in rows], [c for c, _ in cols])


def _by_kind(rows, key):
    """{kind: (ks, values)} over the members that have `key`."""
    out = {}
    for r in rows:
        if r.get(key) not in (None, ""):
            ks, vs = out.setdefault(r["kind"], ([], []))
            ks.append(r["k"]), vs.append(float(r[key]))
    return out


def _figure(title, xlabel, ylabel):
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe headless

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


KIND_STYLE = {"transformer": "o-", "medusa": "s--", "rnn": "^:"}  # marker + line per kind


def _style(kind: str) -> str:
    return KIND_STYLE.get(kind, "d-.")


def _against_k(ax, rows, series):
    """A line per (series, kind): the series by colour, the drafter kind by marker and dash."""
    ks = sorted({r["k"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    for color, (key, label) in enumerate(series):
        for kind, (xs, ys) in _by_kind(rows, key).items():
            order = np.argsort(xs)
            x, y = np.array(xs)[order], np.array(ys)[order]
            ax.plot(x, y, _style(kind), color=f"C{color}", label=f"{label} ({kind})")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """Writes the four PNGs; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = _figure("Drafter top-1 accuracy per offset", "draft offset j", "accuracy")
    ks = sorted({r["k"] for r in rows})
    colors = {k: f"C{i}" for i, k in enumerate(ks)}
    for r in rows:
        js = [j for j in range(1, r["k"] + 1) if f"acc_draft_{j}" in r]
        if js:
            acc = [r[f"acc_draft_{j}"] for j in js]
            ax.plot(js, acc, _style(r["kind"]), color=colors[r["k"]], label=r["name"])
    ax.set_xticks(range(1, max(ks) + 1))
    unigram = [r["unigram_acc"] for r in rows if "unigram_acc" in r]
    if unigram:
        ax.axhline(unigram[0], color="gray", lw=1, ls=":", label="unigram")
    if ax.get_legend_handles_labels()[1]:
        ax.legend(fontsize=7, ncol=2)
    paths.append(_save(fig, out_dir / "draft_accuracy.png"))

    fig, ax = _figure("Mean accepted drafts per pass", "k (drafted tokens per pass)", "accepted")
    _against_k(
        ax,
        rows,
        [
            ("accepted_len", "implied by eval accuracy"),
            ("spec_mean_accepted", "measured, speculative"),
        ],
    )
    paths.append(_save(fig, out_dir / "accepted_length.png"))

    fig, ax = _figure("Speculative speedup over slow (greedy, batch 1)", "k", "speedup (x)")
    ax.axhline(1.0, color="gray", lw=1, ls=":")
    _against_k(ax, rows, [("speedup", "measured")])
    paths.append(_save(fig, out_dir / "speedup.png"))

    fig, ax = _figure("Throughput", "k", "tokens/s")
    _against_k(
        ax,
        rows,
        [
            ("train_tokens_per_s", "training"),
            ("slow_tokens_per_s", "decode slow"),
            ("spec_tokens_per_s", "decode speculative"),
        ],
    )
    ax.set_yscale("log")
    paths.append(_save(fig, out_dir / "tokens_per_s.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def collect(workdir) -> str:
    """Writes WORKDIR/sweep_summary.{csv,md} and the plots; returns the Markdown text."""
    workdir = Path(workdir)
    rows = load_rows(workdir)
    done = sum(r["finished"] for r in rows)
    text = f"## Sweep {workdir.name}: {done}/{len(rows)} runs finished\n\n{markdown(rows)}\n"
    if is_main_process():
        write_csv(rows, workdir / "sweep_summary.csv")
        (workdir / "sweep_summary.md").write_text(text)
        plot(rows, workdir / "plots")
    return text
