r"""A chain against an EAGLE-2 draft tree at equal verification width, from one drafter.

    python benchmarks/tree_width.py --workdir=runs/k8 --chat_task=rg_gsm_symbolic \
        --prompts=8 --max_new_tokens=96 --widths=3,5,9

At verification width W a pass feeds the main token and W - 1 drafts: a chain of the
drafter's W - 1 greedy drafts, or a tree of W - 1 nodes (`--tree_beams` beams expanded to
`--tree_depth`, default the drafter's k; the likeliest paths' nodes kept). The chain is the
one-beam tree of depth W - 1 (`Speculative(tree_nodes=W - 1, tree_beams=1)`, the chain's
accepted lengths exactly: `tests/test_decode_tree.py`), so one drafter of k drafts gives a
chain at every width up to k + 1. Greedy, batch 1; every row is checked against slow
decoding. Prints a markdown table (mean accepted drafts per pass, acceptance by depth, the
tree over the chain) and the command that reproduces it; writes the figures as JSON.
Accepted lengths do not depend on the machine's speed or load.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

import numpy as np
from decode import bench_prompts
from pass_cost import add_source_args, system_from_args


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p)
    p.add_argument("--widths", default="3,5", help="verification widths W (2..k + 1)")
    p.add_argument("--tree_beams", type=int, default=4)
    p.add_argument("--tree_depth", type=int, default=0, help="the tree's depth (0: k)")
    p.add_argument("--chat_task", default="", help="prompts: this task's eval problems, as chat")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=96)
    p.add_argument("--json", default="", help="figures (default: none written)")
    return p.parse_args(argv)


def accepted(dec, prompts, mode, kw, slow_rows) -> dict:
    """Mean accepted drafts per pass and acceptance by depth of `mode` over the prompts, one
    row per call; raises if a row differs from slow's."""
    hist = 0
    for prompt, want in zip(prompts, slow_rows, strict=True):
        res = dec.generate([prompt], mode=mode, **kw)
        if not np.array_equal(res.row(0), want):
            raise AssertionError(f"{mode}: a row differs from slow decoding")
        hist = hist + res.accept_hist
    n = max(int(hist.sum()), 1)
    return dict(
        mean_accepted=float((np.arange(len(hist)) * hist).sum() / n),
        by_depth=[float(hist[j:].sum() / n) for j in range(1, len(hist))],
        passes=int(hist.sum()),
    )


def compare(dec, prompts, kw, widths, beams: int, depth: int) -> list[dict]:
    """Per verification width W: the chain's and the tree's `accepted` figures and the tree's
    mean accepted over the chain's (None when the chain accepts nothing)."""
    from mtp.decode.modes import Speculative

    slow_rows = [dec.generate([p], mode="slow", **kw).row(0) for p in prompts]
    rows = []
    for w in widths:
        n = w - 1
        chain = Speculative(tree_nodes=n, tree_beams=1, tree_depth=n, max_batch=0)
        tree = Speculative(tree_nodes=n, tree_beams=beams, tree_depth=min(depth, n), max_batch=0)
        row = dict(width=w, chain=accepted(dec, prompts, chain, kw, slow_rows))
        row["tree"] = accepted(dec, prompts, tree, kw, slow_rows)
        c, t = row["chain"]["mean_accepted"], row["tree"]["mean_accepted"]
        row["tree_over_chain"] = t / c if c else None
        rows.append(row)
        print(f"width {w}: chain {c:.2f}, tree {t:.2f}", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    from mtp.decode.engine import Decoder

    system, tok = system_from_args(args)
    dec = Decoder(system, tok.specials)
    k, beams, depth = dec.k, args.tree_beams, args.tree_depth or dec.k
    widths = [int(w) for w in args.widths.split(",")]
    if any(not 2 <= w <= k + 1 for w in widths):
        raise SystemExit(f"--widths: each in 2..{k + 1} (a chain of at most k = {k} drafts)")
    prompts, stop_id = bench_prompts(tok, args.chat_task, args.prompts)
    kw = dict(max_new_tokens=args.max_new_tokens, stop_id=stop_id)
    rows = compare(dec, prompts, kw, widths, beams, depth)
    cmd = "python benchmarks/tree_width.py " + " ".join(shlex.quote(a) for a in argv)
    print(
        f"\n# {args.workdir or args.config}: k = {k}; {len(prompts)} prompts, "
        f"{args.max_new_tokens} new tokens, greedy, batch 1, every row equal to slow's; "
        f"trees of {beams} beams, depth min({depth}, W - 1)\n"
    )
    print("| width | chain: accepted | by depth | tree: accepted | by depth | tree / chain |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c, t, n = r["chain"], r["tree"], r["width"] - 1
        fmt = lambda xs, n=n: " ".join(f"{x:.2f}" for x in xs[:n])  # no deeper path fits
        ratio = "-" if r["tree_over_chain"] is None else f"**{r['tree_over_chain']:.2f}x**"
        print(f"| {r['width']} | {c['mean_accepted']:.2f} | {fmt(c['by_depth'])} | "
              f"{t['mean_accepted']:.2f} | {fmt(t['by_depth'])} | {ratio} |")  # fmt: skip
    print(f"\nreproduce: {cmd}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(command=cmd, k=k, beams=beams, depth=depth, rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main()
