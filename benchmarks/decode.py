r"""Decoding speed on one checkpoint: slow vs speculative vs fast, in one run.

    python benchmarks/decode.py --workdir=runs/tiny
    python benchmarks/decode.py --random            # random tiny system, no checkpoint
    python benchmarks/decode.py --workdir=runs/smollm2 --chat_task=rg_gsm_symbolic

With `--chat_task=SPEC` the prompts are held-out (eval split) problems of that task as
user messages in the model's chat template, and rows stop at the end token (a
pretrained instruct model answers, then stops); otherwise eight code prompts.

Eight code prompts (the tiny model is trained on Python source). For each
batch size (1 and 8 by default) every mode decodes all of them, in calls of
`batch` rows: compiled first, then timed `--repeats` times, the modes
interleaved so that they share the machine's noise; the table gives the
median total wall time. Rows do not stop at EOS (every row
emits --max_new_tokens), so all modes produce the same number of tokens;
greedy speculative output is checked to equal slow output. Prints a markdown
table and the command that reproduces it, and writes the figures as JSON.

XLA flags: by default this sets `--xla_cpu_experimental_ynn_fusion_type=`
(before JAX starts), which keeps XLA:CPU from handing small matrix products
to YNNPACK; `--xla_flags=` measures JAX's defaults instead. On 2 idle cores
(jax 0.10.2, 2026-11-23) the speculative/slow ratio at batch 1 was 1.07-1.25x
with the flag and 0.99-1.10x without it (docs/benchmarks.md); under heavy
load the gap was larger.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys

import numpy as np

PROMPTS = [
    "def main(",
    "import os\nimport sys\n\n",
    "class Config:\n    def __init__(self",
    "    for i in range(len(",
    "if __name__ == '__main__':\n",
    "        return self.",
    "# Copyright",
    "    def __repr__(self):\n        return",
]


XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory; its latest (or --step) checkpoint")
    src.add_argument("--random", action="store_true", help="random-weight tiny system")
    p.add_argument("--step", type=int, default=None)
    p.add_argument(
        "--modes",
        default="slow,speculative,tree,fast",
        help="modes of mtp.decode.modes, and 'tree': speculative with a draft tree",
    )
    p.add_argument(
        "--tree_nodes",
        type=int,
        default=0,
        help="the tree's nodes (0: k, the chain's verification width)",
    )
    p.add_argument("--tree_beams", type=int, default=4, help="the tree's beams per depth")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many prompts")
    p.add_argument("--chat_task", default="", help="prompts: this task's eval problems, as chat")
    p.add_argument("--json", default=None, help="figures; default WORKDIR/decode_benchmark.json")
    p.add_argument("--xla_flags", default=XLA_FLAGS, help="added to $XLA_FLAGS before JAX starts")
    return p.parse_args(argv)


def _system(args):
    """(system, its tokenizer, its ModelConfig, where it came from); imports JAX."""
    from mtp.data.tokenizer import ByteTokenizer, tokenizer_of

    if args.random:
        from flax import nnx

        from mtp.config import DrafterConfig, ModelConfig
        from mtp.model.system import MTPSystem

        tok = ByteTokenizer()
        main = ModelConfig(vocab_size=264, d_model=128, n_layers=4, max_len=256)
        system = MTPSystem(main, DrafterConfig(k=4), pad_id=tok.specials.pad, rngs=nnx.Rngs(0))
        return system, tok, main, "random"
    from mtp.checkpoint import load_system

    system, run = load_system(args.workdir, step=args.step)
    return system, tokenizer_of(run), run.model, args.workdir


def main(argv=None):
    args = _args(sys.argv[1:] if argv is None else argv)
    if "jax" in sys.modules and args.xla_flags:
        print("warning: JAX already imported; --xla_flags may not apply", file=sys.stderr)
    xla_flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), args.xla_flags) if f)
    os.environ["XLA_FLAGS"] = xla_flags
    import jax

    from mtp.data.format import encode_question
    from mtp.data.task_data import parse_task_spec
    from mtp.decode.engine import Decoder
    from mtp.decode.modes import Speculative
    from mtp.decode.report import _check_modes
    from mtp.decode.sampling import Sampling

    labels = args.modes.split(",")
    _check_modes([m for m in labels if m != "tree"] or ["slow"])
    system, tok, cfg, source = _system(args)
    sampling = Sampling(temperature=args.temperature)
    dec = Decoder(system, tok.specials)
    tree = Speculative(tree_nodes=args.tree_nodes or dec.k, tree_beams=args.tree_beams)
    modes = {m: tree if m == "tree" else m for m in labels if m.strip()}
    verified_modes = ("speculative", "tree")
    if args.chat_task:
        task, _ = parse_task_spec(args.chat_task)
        examples = task.examples("eval", args.prompts, start=0)
        prompts = [encode_question(tok, ex.prompt) for ex in examples]
        stop_id = None  # rows stop at the end token: what a chat user waits for
    else:
        prompts = [encode_question(tok, p, chat=False) for p in PROMPTS[: args.prompts]]
        stop_id = -1  # no row stops early, so every mode emits the same number of tokens
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop_id=stop_id)
    figures = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # every prompt once per repeat: in groups of `batch` rows (cycling to fill the last)
        groups = [
            [prompts[(g + i) % len(prompts)] for i in range(batch)]
            for g in range(0, len(prompts), batch)
        ]
        for m in modes:  # compile (the prefill once per prompt width bucket)
            for g in groups:
                dec.generate(g, mode=modes[m], **kw)
        walls, last = {m: [] for m in modes}, {}
        for _ in range(args.repeats):
            for m in modes:
                runs = [dec.generate(g, mode=modes[m], **kw) for g in groups]
                assert not any(r.compiled for r in runs)
                walls[m].append(sum(r.wall_s for r in runs))
                last[m] = runs
        base = float(np.median(walls["slow"])) if "slow" in walls else None
        for m in modes:
            runs, wall = last[m], float(np.median(walls[m]))
            tokens = sum(int(r.lengths.sum()) for r in runs)
            hist = sum(r.accept_hist for r in runs)
            verified = max(int(hist.sum()), 1)
            row = dict(
                batch=batch,
                mode=m,
                calls=len(runs),
                tokens=tokens,
                main_passes=sum(r.batch_passes for r in runs),
                tokens_per_pass=tokens / sum(int(r.passes.sum()) for r in runs),
                mean_accepted=float((np.arange(len(hist)) * hist).sum() / verified)
                if m in verified_modes
                else None,
                accept_rate=[float(hist[j:].sum() / verified) for j in range(1, len(hist))]
                if m in verified_modes
                else None,
                wall_s_median=wall,
                wall_s_min=float(np.min(walls[m])),
                tokens_per_s=tokens / wall,
                speedup_vs_slow=(base / wall) if base else None,
            )
            if m in verified_modes and "slow" in last and sampling.greedy:
                row["identical_to_slow"] = all(
                    np.array_equal(a.tokens, b.tokens)
                    for a, b in zip(runs, last["slow"], strict=True)
                )
            figures.append(row)

    cmd = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    k = dec.k
    print(
        f"# decode benchmark: {source} (d_model {cfg.d_model}, {cfg.n_layers} layers, k={k}), "
        f"{args.max_new_tokens} new tokens per row, {sampling}, median of {args.repeats}; "
        f"tree: {tree.tree_nodes} nodes ({tree.tree_beams} beams), verification width "
        f"{tree.width(k)} against the chain's {k + 1}"
    )
    print(
        f"# {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"XLA_FLAGS={xla_flags!r}\n"
    )
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
        print(
            f"| {r['batch']} | {r['mode']}{same or ''} | {r['tokens_per_s']:.0f} | {speed} "
            f"| {r['tokens_per_pass']:.2f} | {mean_acc} | {acc} | {1e3 * r['wall_s_median']:.1f} |"
        )
    print(f"\nreproduce: {cmd}")
    out = dict(
        command=cmd,
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=dict(
            device=jax.devices()[0].device_kind,
            platform=platform.platform(),
            cpus=os.cpu_count(),
            jax=jax.__version__,
            xla_flags=xla_flags,
        ),
        source=source,
        model=dict(d_model=cfg.d_model, n_layers=cfg.n_layers, max_len=cfg.max_len, k=k),
        tree=dict(nodes=tree.tree_nodes, beams=tree.tree_beams),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        results=figures,
    )
    path = args.json or os.path.join(args.workdir or ".", "decode_benchmark.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
