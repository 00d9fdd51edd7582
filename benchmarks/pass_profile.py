r"""What a main pass spends its time on, op by op: XLA's own trace of the compiled pass.

    python benchmarks/pass_profile.py --workdir=runs/smollm2
    python benchmarks/pass_profile.py --config=experiments/smollm2_drafter.py --widths=1,5

The main pass feeding W tokens (`--widths`; 1 is slow mode's pass, k + 1 a chain's
verification) at `--batch` rows with `--context` tokens in a cache of `--slots` slots,
jitted as the decoding loop compiles it (the cache donated and written in place), is run
`--repeats` times under `jax.profiler.trace`. The trace's events of each run (its `run_id`)
are the ops XLA ran: grouped by kind (`dot`, `ynn_fusion`, `copy`, ...; the HLO name without
its number), each kind's mean count and time per pass, and the median pass's span from its
first op's start to its last op's end, the time some op was running (busy) and the rest
(idle gaps: dispatch between ops). Ops that run at once on several threads add up past
the span. Prints a markdown table per width and the command that reproduces it.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import shlex
import sys
import tempfile

from pass_cost import add_source_args, system_from_args


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p)
    p.add_argument("--widths", default="1,5", help="tokens fed per pass")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    p.add_argument("--slots", type=int, default=256, help="the cache's slots")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top", type=int, default=12, help="op kinds listed")
    return p.parse_args(argv)


def op_events(trace_dir: str) -> dict[str, list[dict]]:
    """The ops of each run in a `jax.profiler.trace` directory, by run id: complete events
    that name an HLO op."""
    path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
    runs = collections.defaultdict(list)
    for e in json.load(gzip.open(path))["traceEvents"]:
        args = e.get("args", {})
        if e.get("ph") == "X" and "hlo_op" in args and "run_id" in args:
            runs[args["run_id"]].append(e)
    return runs


def split(ops: list[dict]) -> dict:
    """One run's span, busy and idle time (us) and time and count by op kind."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in ops)
    busy, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > hi:
            busy, lo = busy + hi - lo, s
        hi = max(hi, e)
    busy += hi - lo
    span = max(e for _, e in spans) - spans[0][0]
    kinds, counts = collections.Counter(), collections.Counter()
    for e in ops:
        kind = re.sub(r"(\.\d+)+$", "", e["args"]["hlo_op"])
        kinds[kind] += e["dur"]
        counts[kind] += 1
    return dict(span=span, busy=busy, idle=span - busy, kinds=kinds, counts=counts)


def profile(system, width: int, batch: int, context: int, repeats: int) -> dict:
    """`repeats` passes feeding `width` tokens: the span, busy and idle time of the median
    pass by span (ms; one slow pass does not move them), the op kinds' mean time (ms) and
    count per pass, and every pass's `split` (us)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtp.decode.engine import compiler_options

    graph, state = nnx.split(system)
    zeros_b = jnp.zeros((batch,), jnp.int32)
    prompt_bt = jnp.zeros((batch, context), jnp.int32)
    cache = jax.jit(
        lambda st: nnx.merge(graph, st).main_pass(prompt_bt, zeros_b, system.init_cache(batch))
    )(state)[2]
    pos_b = zeros_b + context

    @functools.partial(jax.jit, donate_argnums=1, compiler_options=compiler_options())
    def one_pass(state, cache):
        s = nnx.merge(graph, state)
        at = {"logits_at_b": zeros_b} if width == 1 else {}  # slow mode's head: one place
        logits, _, cache = s.main_pass(jnp.zeros((batch, width), jnp.int32), pos_b, cache, **at)
        return logits, cache

    for _ in range(3):  # compiled and warm
        logits, cache = one_pass(state, cache)
    jax.block_until_ready(logits)
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(repeats):
                logits, cache = one_pass(state, cache)
                jax.block_until_ready(logits)
        runs = [split(ops) for ops in op_events(trace_dir).values()]
    if len(runs) != repeats:
        raise RuntimeError(f"the trace holds {len(runs)} runs of the pass, not {repeats}")
    mid = sorted(runs, key=lambda r: r["span"])[len(runs) // 2]  # the median pass
    kinds = collections.Counter()
    counts = collections.Counter()
    for r in runs:
        kinds.update(r["kinds"])
        counts.update(r["counts"])
    return dict(
        span=mid["span"] / 1e3, busy=mid["busy"] / 1e3, idle=mid["idle"] / 1e3,
        ops=sum(counts.values()) / repeats,
        kinds={k: (v / repeats / 1e3, counts[k] / repeats) for k, v in kinds.most_common()},
        runs=runs,
    )  # fmt: skip


def main(argv=None) -> dict[int, dict]:
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    import jax

    system, _ = system_from_args(args)
    system = system.with_max_len(args.slots)
    cfg = system.main.cfg
    out = {}
    cmd = "python benchmarks/pass_profile.py " + " ".join(shlex.quote(a) for a in argv)
    print(
        f"# pass profile: {args.workdir or args.config}: d_model {cfg.d_model}, "
        f"{cfg.n_layers} layers; batch {args.batch}, {args.context} tokens in a cache of "
        f"{args.slots} slots; {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"{args.repeats} passes: span, busy and idle of the median pass, op kinds' means"
    )
    for w in (int(x) for x in args.widths.split(",")):
        p = out[w] = profile(system, w, args.batch, args.context, args.repeats)
        print(
            f"\n## {w} token(s) fed: span {p['span']:.2f} ms, busy {p['busy']:.2f} ms, "
            f"idle gaps {p['idle']:.2f} ms, {p['ops']:.0f} ops\n"
        )
        print("| op kind | ops per pass | ms per pass | / span |\n|---|---|---|---|")
        for kind, (ms, n) in list(p["kinds"].items())[: args.top]:
            print(f"| {kind} | {n:.0f} | {ms:.3f} | {ms / p['span']:.2f} |")
    print(f"\nreproduce: {cmd}")
    return out


if __name__ == "__main__":
    main()
