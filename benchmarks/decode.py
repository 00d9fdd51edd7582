r"""Decoding speed on one checkpoint: slow vs speculative vs fast, in one run.

    python benchmarks/decode.py --workdir=runs/tiny
    python benchmarks/decode.py --random            # random tiny system, no checkpoint

For each batch size (1 and 8 by default) every mode is compiled first, then
timed `--repeats` times, the modes interleaved so that they share the
machine's noise; the table gives medians. Rows do not stop at EOS (every row
emits --max_new_tokens), so all modes produce the same number of tokens;
greedy speculative output is checked to equal slow output. Prints a markdown
table and the command that reproduces it, and writes the figures as JSON.
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


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="run directory; its latest (or --step) checkpoint")
    src.add_argument("--random", action="store_true", help="random-weight tiny system")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--modes", default="slow,speculative,fast")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", default="benchmarks/decode.json", help="where to write figures")
    return p.parse_args(argv)


def _system(args):
    if args.random:
        from flax import nnx

        from mtp.config import DrafterConfig, ModelConfig
        from mtp.data.tokenizer import PAD_ID
        from mtp.model.system import MTPSystem

        main = ModelConfig(vocab_size=264, d_model=128, n_layers=4, max_len=256)
        return MTPSystem(main, DrafterConfig(k=4), pad_id=PAD_ID, rngs=nnx.Rngs(0)), "random"
    from mtp.checkpoint import load_system

    system, _ = load_system(args.workdir, step=args.step)
    return system, args.workdir


def main(argv=None):
    args = _args(sys.argv[1:] if argv is None else argv)
    import jax

    from mtp.data.tokenizer import ByteTokenizer
    from mtp.decode.engine import Decoder
    from mtp.decode.report import _check_modes
    from mtp.decode.sampling import Sampling

    modes = _check_modes(args.modes.split(","))
    system, source = _system(args)
    tok = ByteTokenizer()
    sampling = Sampling(temperature=args.temperature)
    dec = Decoder(system, eos_id=-1)  # no row stops early: equal output in every mode
    figures = []
    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = [
            np.concatenate([[tok.bos_id], tok.encode(PROMPTS[i % len(PROMPTS)])])
            for i in range(batch)
        ]
        kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling)
        runs = {m: [dec.generate(prompts, mode=m, **kw)] for m in modes}  # compile
        walls = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                res = dec.generate(prompts, mode=m, **kw)
                assert not res.compiled
                walls[m].append(res.wall_s)
                runs[m] = res
        base = float(np.median(walls["slow"])) if "slow" in walls else None
        for m in modes:
            st, wall = runs[m].stats, float(np.median(walls[m]))
            row = dict(
                batch=batch,
                mode=m,
                tokens=st["tokens"],
                main_passes=st["main_passes"],
                tokens_per_pass=st["tokens_per_pass"],
                mean_accepted=st.get("mean_accepted"),
                accept_rate=st.get("accept_rate"),
                wall_s_median=wall,
                wall_s_min=float(np.min(walls[m])),
                tokens_per_s=st["tokens"] / wall,
                speedup_vs_slow=(base / wall) if base else None,
            )
            if m == "speculative" and "slow" in runs and sampling.greedy:
                row["identical_to_slow"] = bool(np.array_equal(runs[m].tokens, runs["slow"].tokens))
            figures.append(row)

    cmd = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    k = dec.k
    cfg = system.main.cfg
    print(
        f"# decode benchmark: {source} (d_model {cfg.d_model}, {cfg.n_layers} layers, k={k}), "
        f"{args.max_new_tokens} new tokens per row, {sampling}, median of {args.repeats}"
    )
    print(f"# {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}\n")
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
        ),
        source=source,
        model=dict(d_model=cfg.d_model, n_layers=cfg.n_layers, max_len=cfg.max_len, k=k),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        results=figures,
    )
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
