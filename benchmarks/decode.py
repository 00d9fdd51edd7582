r"""Decoding speed on one checkpoint: slow vs speculative vs fast, in one run.

    python benchmarks/decode.py --workdir=runs/tiny
    python benchmarks/decode.py --random            # random tiny system, no checkpoint
    python benchmarks/decode.py --workdir=runs/smollm2 --chat_task=rg_gsm_symbolic \
        --peers=transformers,prompt_lookup,llamacpp_f32,llamacpp_f16
    python benchmarks/decode.py --config=experiments/smollm2_drafter.py \
        --drafter=runs/smollm2/drafter.safetensors --chat_task=rg_gsm_symbolic   # a drafter file

With `--chat_task=SPEC` the prompts are held-out (eval split) problems of that task as
user messages in the model's chat template, and rows stop at the end token (a
pretrained instruct model answers, then stops); otherwise eight code prompts.

Eight code prompts (the tiny model is trained on Python source). For each
batch size (1 and 8 by default) every mode decodes all of them, in calls of
`batch` rows: compiled first, then timed `--repeats` times (peers
`--peer_repeats` times) in rounds, each round running every mode and every
peer, so that every ratio shares the machine's drift; the table gives the
total wall time, each call's best of the repeats (`peers.best_total`). Rows
do not stop at EOS (every row emits --max_new_tokens), so all modes produce
the same number of tokens; greedy speculative output is checked to equal slow output. Past
`--spec_max_batch` rows (default: the backend's limit, 4 rows on CPU) the
speculative and tree rows decode in slow mode, and say so. `--peers` adds
other engines on the same weights and prompts (benchmarks/peers.py), and every
batch gets a bandwidth-bound row: batch x read bandwidth / weight bytes, the
tokens/s of a pass that only read the weights. Prints a markdown table and the
command that reproduces it, writes the figures as JSON and a plot of speedup
over mtp slow against batch size as PNG beside it.

XLA flags: `--xla_flags=FLAGS` adds FLAGS to $XLA_FLAGS before JAX starts; by
default none (JAX's defaults). `--xla_flags=--xla_cpu_experimental_ynn_fusion_type=`
keeps XLA:CPU from handing small matrix products to YNNPACK: on the 1M-parameter
tiny model that was slightly faster (2026-11-23), but on SmolLM2-135M it makes a
5-token verification pass cost 2.98x a 1-token pass instead of 1.29x
(benchmarks/pass_cost.py, 2026-12-02, idle; docs/benchmarks.md).

`--matmul_precision=float32` runs every call with float32 matrix products. JAX's default
rounds float32 products to TensorFloat32 on recent NVIDIA GPUs (bfloat16 on TPUs), and
there greedy speculative rows can differ from slow's (an H200, 2026-12-04).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
from decode_table import plot, print_table
from pass_cost import add_source_args, system_from_args
from peers import PEERS, best_total, peer_files, peer_runner

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


XLA_FLAGS = ""  # JAX's defaults (YNNPACK on): see the docstring


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = add_source_args(p)
    src.add_argument("--random", action="store_true", help="random-weight tiny system")
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
    p.add_argument(
        "--xla_modes",
        default="",
        help="also these of --modes with XLA's weight products, not packed ones (a Decoder "
        "with packed=False; mtp.model.packed_products), in the same rounds",
    )
    p.add_argument(
        "--spec_max_batch",
        type=int,
        default=None,
        help="speculative and tree: slow past this many rows (0: never; default: the "
        "backend's, mtp.decode.modes.speculative.MAX_BATCH)",
    )
    p.add_argument(
        "--peers",
        default="",
        help=f"also decode with these peers (benchmarks/peers.py): any of {','.join(PEERS)}",
    )
    p.add_argument("--peer_repeats", type=int, default=3, help="timed rounds per peer")
    p.add_argument("--bandwidth_gib", type=float, default=1.0, help="GiB read to time bandwidth")
    p.add_argument(
        "--cache_len",
        type=int,
        default=0,
        help="model.max_len for this run (0: the checkpoint's): llama.cpp's n_ctx and the "
        "most slots an mtp call's cache gets (each call's own: mtp.decode.shapes.cache_slots)",
    )
    p.add_argument("--batches", default="1,8")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many prompts")
    p.add_argument("--chat_task", default="", help="prompts: this task's eval problems, as chat")
    p.add_argument("--json", default=None, help="figures; default WORKDIR/decode_benchmark.json")
    p.add_argument("--xla_flags", default=XLA_FLAGS, help="added to $XLA_FLAGS before JAX starts")
    p.add_argument(
        "--matmul_precision",
        default="default",
        choices=("default", "float32", "tensorfloat32", "bfloat16"),
        help="jax.default_matmul_precision of every call: 'default' is the backend's (float32 "
        "on CPU, TensorFloat32 on recent NVIDIA GPUs, bfloat16 on TPU); greedy speculative "
        "rows equal slow's at float32",
    )
    return p.parse_args(argv)


def _system(args):
    """(system, its tokenizer, where it came from); imports JAX."""
    from mtp.data.tokenizer import ByteTokenizer

    if args.random:
        from flax import nnx

        from mtp.config import DrafterConfig, ModelConfig
        from mtp.model.system import MTPSystem

        tok = ByteTokenizer()
        main = ModelConfig(vocab_size=264, d_model=128, n_layers=4, max_len=256)
        system = MTPSystem(main, DrafterConfig(k=4), pad_id=tok.specials.pad, rngs=nnx.Rngs(0))
        return system, tok, "random"
    system, tok = system_from_args(args)
    source = args.workdir or " + ".join(filter(None, (args.config, args.drafter)))
    return system, tok, source


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads: the best of `repeats` jitted sums over `gib` GiB
    of float32 (all cores), the figure a weight-bandwidth bound divides by."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((int(gib * 2**30) // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return x.nbytes / best


def bench_prompts(tok, chat_task: str, n: int):
    """(prompts, stop_id): `chat_task`'s first n held-out (eval) problems as chat, rows stopping
    at the end token (what a chat user waits for), or the first n code prompts, rows never
    stopping (every mode emits the same number of tokens)."""
    from mtp.data.format import encode_question
    from mtp.data.task_data import parse_task_spec

    if chat_task:
        task, _ = parse_task_spec(chat_task)
        return [encode_question(tok, ex.prompt) for ex in task.examples("eval", n, start=0)], None
    return [encode_question(tok, p, chat=False) for p in PROMPTS[:n]], -1


def _mtp_call(dec, mode, kw, prompts):
    """(DecodeResult, its wall s) of one mtp call."""
    res = dec.generate(prompts, mode=mode, **kw)
    return res, res.wall_s


def _peer_call(run, prompts):
    """(emitted ids per prompt, wall s) of one peer call."""
    t0 = time.perf_counter()
    out = run(prompts)
    return out, time.perf_counter() - t0


def tokens_of(runs) -> int:
    return sum(int(r.lengths.sum()) for r in runs)


def _row(batch, mode, tokens_per_s, slow_tps) -> dict:
    """A table row that is not an mtp mode: a peer or the bandwidth bound."""
    return dict(
        batch=batch, mode=mode, ran_as=mode, tokens_per_s=tokens_per_s,
        speedup_vs_slow=tokens_per_s / slow_tps if slow_tps else None, tokens_per_pass=None,
        mean_accepted=None, accept_rate=None, wall_s=None,
    )  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    if "jax" in sys.modules and args.xla_flags:
        print("warning: JAX already imported; --xla_flags may not apply", file=sys.stderr)
    xla_flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), args.xla_flags) if f)
    os.environ["XLA_FLAGS"] = xla_flags
    import jax

    precision = None if args.matmul_precision == "default" else args.matmul_precision
    with jax.default_matmul_precision(precision):
        return _benchmark(args, argv, xla_flags)


def _benchmark(args, argv, xla_flags):
    """main() once JAX has started: decodes, times, prints and writes the figures."""
    import jax
    from flax import nnx

    from mtp.decode.engine import Decoder
    from mtp.decode.modes import Speculative
    from mtp.decode.report import _check_modes
    from mtp.decode.sampling import Sampling

    labels = args.modes.split(",")
    _check_modes([m for m in labels if m != "tree"] or ["slow"])
    system, tok, source = _system(args)
    cfg = system.main.cfg
    if args.cache_len:  # the same weights, another cache limit (`MTPSystem.with_max_len`)
        system = system.with_max_len(args.cache_len)
    cache_len = system.max_len
    peers = [p for p in args.peers.split(",") if p]
    if set(peers) - set(PEERS):
        raise SystemExit(f"--peers: unknown {sorted(set(peers) - set(PEERS))}; allowed: {PEERS}")
    json_path = args.json or os.path.join(args.workdir or ".", "decode_benchmark.json")
    peer_dir = os.path.join(os.path.dirname(json_path) or ".", "peer_weights")
    files = peer_files(system, tok, peer_dir, peers) if peers else {}
    weight_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(system.main)))
    bandwidth = read_bandwidth(args.bandwidth_gib)
    sampling = Sampling(temperature=args.temperature)
    dec = Decoder(system, tok.specials)
    if not set(filter(None, args.xla_modes.split(","))) <= set(labels):
        raise SystemExit(f"--xla_modes: a subset of --modes ({args.modes}), not {args.xla_modes}")
    xla_dec = Decoder(system, tok.specials, packed=False) if args.xla_modes else None
    off = args.spec_max_batch
    tree = Speculative(
        tree_nodes=args.tree_nodes or dec.k, tree_beams=args.tree_beams, max_batch=off
    )
    chain = Speculative(max_batch=off)
    modes = {m: {"tree": tree, "speculative": chain}.get(m, m) for m in labels if m.strip()}
    # every mtp row: its label -> (decoder, mode label)
    engines = {m: (dec, m) for m in modes}
    engines |= {f"{m} (XLA products)": (xla_dec, m) for m in args.xla_modes.split(",") if m}
    verified_modes = ("speculative", "tree")
    prompts, stop_id = bench_prompts(tok, args.chat_task, args.prompts)
    stop = tok.specials.eos if stop_id is None else stop_id  # the peers stop alike
    kw = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop_id=stop_id)
    peer_kw = dict(
        eos_id=stop, pad_id=tok.specials.pad, max_new=args.max_new_tokens, n_ctx=cache_len
    )
    figures = []
    for batch in [int(b) for b in args.batches.split(",")]:
        # every prompt once per repeat: in groups of `batch` rows (cycling to fill the last)
        groups = [
            [prompts[(g + i) % len(prompts)] for i in range(batch)]
            for g in range(0, len(prompts), batch)
        ]
        peer_runs = {name: peer_runner(name, files, batch, **peer_kw) for name in peers}
        peer_runs = {name: run for name, run in peer_runs.items() if run is not None}
        # every engine: call(group) -> (output, wall s); timed in rounds of `rounds[name]`
        calls = {m: functools.partial(_mtp_call, d, modes[x], kw) for m, (d, x) in engines.items()}
        calls |= {name: functools.partial(_peer_call, run) for name, run in peer_runs.items()}
        rounds = {m: args.repeats for m in engines} | {n: args.peer_repeats for n in peer_runs}
        for call in calls.values():  # compile mtp (a prefill per prompt width), warm peers
            for g in groups:
                call(g)
        walls, last = {name: [] for name in calls}, {}
        # each round runs every mode, then every peer, so that the ratios share this
        # machine's drift
        for i in range(max(rounds.values())):
            for name, call in calls.items():
                if i < rounds[name]:
                    outs, walls_g = zip(*(call(g) for g in groups), strict=True)
                    walls[name].append(walls_g)
                    last[name] = list(outs)
        base = best_total(walls["slow"]) if "slow" in walls else None
        for m, (d, mm) in engines.items():
            runs, wall = last[m], best_total(walls[m])
            assert not any(r.compiled for r in runs)
            verifies = mm in verified_modes and runs[0].mode == "speculative"
            tokens = tokens_of(runs)
            hist = sum(r.accept_hist for r in runs)
            verified = max(int(hist.sum()), 1)
            row = dict(
                batch=batch,
                mode=mm,
                packed_products=d.packed,
                ran_as=runs[0].mode,  # speculation is off past max_batch rows: slow
                calls=len(runs),
                tokens=tokens,
                main_passes=sum(r.batch_passes for r in runs),
                tokens_per_pass=tokens / sum(int(r.passes.sum()) for r in runs),
                mean_accepted=float((np.arange(len(hist)) * hist).sum() / verified)
                if verifies
                else None,
                accept_rate=[float(hist[j:].sum() / verified) for j in range(1, len(hist))]
                if verifies
                else None,
                wall_s=wall,
                tokens_per_s=tokens / wall,
                speedup_vs_slow=(base / wall) if base else None,
            )
            if mm in verified_modes and "slow" in last and sampling.greedy:
                row["identical_to_slow"] = all(  # row by row: caches differ in size by mode
                    np.array_equal(a.row(i), b.row(i))
                    for a, b in zip(runs, last["slow"], strict=True)
                    for i in range(a.lengths.size)
                )
            figures.append(row)
        slow_tps = tokens_of(last["slow"]) / base if base else None
        bound = batch * bandwidth / weight_bytes  # tokens/s if a pass only read the weights
        figures.append(_row(batch, "bandwidth bound", bound, slow_tps))
        for name in peer_runs:
            outs, wall = [row for o in last[name] for row in o], best_total(walls[name])
            row = _row(batch, name, sum(len(o) for o in outs) / wall, slow_tps)
            mine = [r.row(i) for r in last.get("slow", ()) for i in range(r.lengths.size)]
            same = [np.array_equal(a, b) for a, b in zip(outs, mine, strict=False)]
            row |= dict(
                wall_s=wall,
                tokens=sum(len(o) for o in outs),
                same_rows=float(np.mean(same)) if same else None,  # greedy rows equal mtp slow's
            )
            figures.append(row)

    cmd = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in argv)
    k = dec.k
    print(
        f"# decode benchmark: {source} (d_model {cfg.d_model}, {cfg.n_layers} layers, k={k}), "
        f"{args.max_new_tokens} new tokens per row, caches of at most {cache_len} slots, "
        f"{sampling}, "
        f"best of {args.repeats} per call; "
        f"tree: {tree.tree_nodes} nodes ({tree.tree_beams} beams), verification width "
        f"{tree.width(k)} against the chain's {k + 1}"
    )
    print(
        f"# {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
        f"XLA_FLAGS={xla_flags!r}, matmul precision {args.matmul_precision}; "
        f"main weights {weight_bytes / 1e6:.0f} MB, read bandwidth "
        f"{bandwidth / 1e9:.1f} GB/s (bandwidth bound: batch x bandwidth / weight bytes)\n"
    )
    print_table(figures)
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
            matmul_precision=args.matmul_precision,
        ),
        source=source,
        model=dict(d_model=cfg.d_model, n_layers=cfg.n_layers, max_len=cfg.max_len, k=k),
        cache_len=cache_len,
        tree=dict(nodes=tree.tree_nodes, beams=tree.tree_beams),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        repeats=args.repeats,
        weight_bytes=weight_bytes,
        read_bandwidth_bytes_per_s=bandwidth,
        peers=peers,
        results=figures,
    )
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(out, f, indent=2)
    png = os.path.splitext(json_path)[0] + ".png"
    plot(figures, png)
    print(f"wrote {json_path} and {png}")
    return out


if __name__ == "__main__":
    main()
