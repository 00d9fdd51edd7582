"""benchmarks/decode.py's output: the markdown table and the plot of speedup against batch."""

from __future__ import annotations


def label(r, figures) -> str:
    """A row's engine: its mode, and "(XLA products)" beside packed rows of the same run."""
    xla = r.get("packed_products") is False and any(x.get("packed_products") for x in figures)
    return r["mode"] + (" (XLA products)" if xla else "")


def print_table(figures) -> None:
    """One markdown row per figure (an mtp mode, a peer or the bandwidth bound)."""
    print(
        "| batch | mode | tokens/s | speedup vs slow | tokens/pass | mean accepted "
        "| acceptance by offset | wall ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in figures:
        acc = " ".join(f"{a:.2f}" for a in r["accept_rate"]) if r["accept_rate"] else "-"
        mean_acc = f"{r['mean_accepted']:.2f}" if r["mean_accepted"] is not None else "-"
        speed = f"{r['speedup_vs_slow']:.2f}x" if r["speedup_vs_slow"] else "-"
        same = {True: " (= slow)", False: " (DIFFERS from slow)"}.get(r.get("identical_to_slow"))
        if r["ran_as"] != r["mode"].replace("tree", "speculative"):
            same = f" (off: ran as {r['ran_as']})"
        if r.get("same_rows") is not None:
            same = f" ({r['same_rows']:.0%} of rows = mtp slow)"
        tpp = f"{r['tokens_per_pass']:.2f}" if r["tokens_per_pass"] is not None else "-"
        wall = f"{1e3 * r['wall_s']:.1f}" if r["wall_s"] is not None else "-"
        print(
            f"| {r['batch']} | {label(r, figures)}{same or ''} | {r['tokens_per_s']:.0f} | {speed} "
            f"| {tpp} | {mean_acc} | {acc} | {wall} |"
        )


def plot(figures, path) -> None:
    """Speedup over mtp slow against batch size, one line per mode or peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(label(r, figures) for r in figures):
        pts = [(r["batch"], r["speedup_vs_slow"]) for r in figures if label(r, figures) == mode]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            style = ":" if mode == "bandwidth bound" else "-"
            ax.plot(*zip(*pts, strict=True), marker="o", label=mode, ls=style)
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set(xscale="log", xlabel="batch (rows per call)", ylabel="tokens/s over mtp slow")
    batches = sorted({r["batch"] for r in figures})
    ax.set_xticks(batches, labels=[str(b) for b in batches])
    ax.set_xticks([], minor=True)  # no log-scale minor labels (2x10^0, ...)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
