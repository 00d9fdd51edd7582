r"""Where a speculative pass's time goes: main pass, drafter, verification bookkeeping.

    python benchmarks/pass_cost.py --workdir=runs/smollm2
    python benchmarks/pass_cost.py --config=experiments/smollm2_drafter.py   # untrained, same cost
    python benchmarks/pass_cost.py --config=experiments/smollm2_drafter.py --dtype=bfloat16
    python benchmarks/pass_cost.py --config=experiments/smollm2_drafter.py \
        --drafter=runs/smollm2/drafter.safetensors   # a trained drafter, from its file alone

Times, jitted and warm, at `--batch` rows with `--context` tokens in the cache:
- main, 1 token: slow mode's pass (the LM head at the one fed token);
- the main model's weight products alone: each 2-D weight times B vectors in one jit, one
  after the other (each input depends on the previous product, as in a pass: the floor the
  products set, the rest of a pass being attention, norms, RoPE and the cache write) and
  independent (what the same bytes cost when XLA may merge or overlap the products);
- main, k + 1 tokens: the verification pass of a chain (logits at every fed token); with
  `--widths` also other widths (a draft tree of N nodes feeds N + 1 tokens);
- drafter, k steps: `MTPSystem.draft` after one main token, greedy, its tables (a shared
  head's trimmed columns) computed beforehand, once, as a decoding call does; with
  `--tree_nodes=N` also `MTPSystem.draft_tree` (`--tree_beams` beams, depth k), the main
  pass feeding N + 1 tokens, and the tree's loop and bookkeeping as below;
- the whole loop per pass, from `Decoder.generate` (slow and speculative, 2 x `--new_tokens`
  per row, rows never stop; a call's wall time less its prefill's, per loop pass):
  for speculative, what is left after its main pass and drafter is the bookkeeping
  (verification, emission, cache positions).
With `--products=xla,packed` (the default where `mtp.model.packed_products` is available)
every figure is taken twice in one run, with XLA's products and on packed weights, side by
side with their ratio. Every pass runs on the cache those calls get (`shapes.cache_slots` of
the context plus twice `--new_tokens`).
Every figure is the best of `--repeats` timed calls (other load only adds time), also
as a fraction of the one-token main pass. Prints a markdown table and the command that
reproduces it.
"""

from __future__ import annotations

import argparse
import functools
import os
import runpy
import shlex
import sys
import time

import numpy as np

XLA_FLAGS = ""  # added to $XLA_FLAGS before JAX starts; as benchmarks/decode.py


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_source_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=128, help="tokens already in the cache")
    p.add_argument("--new_tokens", type=int, default=64, help="per row, for the loop figures")
    p.add_argument(
        "--widths", default="", help="also time main passes feeding these many tokens (e.g. 2,9,17)"
    )
    p.add_argument(
        "--tree_nodes", type=int, default=0, help="also a draft tree of N nodes: drafter, loop"
    )
    p.add_argument("--tree_beams", type=int, default=4, help="with --tree_nodes: beams per depth")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--products",
        default="",
        help="xla, packed or xla,packed: whose weight products "
        "(default: both where the packed kernel is available)",
    )
    p.add_argument("--xla_flags", default=XLA_FLAGS)
    return p.parse_args(argv)


def add_source_args(p: argparse.ArgumentParser):
    """The system a benchmark times (`system_from_args`): a run directory, or an experiment
    file with its main model's checkpoint and, optionally, a drafter file. Returns the
    mutually exclusive group, for a script's other sources."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a trained run directory (its latest or --step checkpoint)")
    src.add_argument("--config", help="an experiment file[:variant]: its system, drafter untrained")
    p.add_argument("--step", type=int, default=None, help="with --workdir: this checkpoint")
    p.add_argument(
        "--drafter", default="", help="with --config: the drafter from this drafter file"
    )
    p.add_argument(
        "--dtype", default="", help="with --config: model.param_dtype and model.dtype (bfloat16)"
    )
    return src


def system_from_args(args):
    """(system, tokenizer) of `--workdir` (trained) or `--config` (the main model's checkpoint
    loaded; the drafter untrained, or `--drafter`'s), `--dtype` applied to a config."""
    from mtp.checkpoint import load_system
    from mtp.config import resolve
    from mtp.data.tokenizer import tokenizer_of
    from mtp.train.pretrained import with_checkpoint_shapes
    from mtp.train.steps import make_system

    if args.workdir:
        if args.drafter or args.dtype:
            raise SystemExit("--drafter and --dtype go with --config, not --workdir")
        system, run = load_system(args.workdir, step=args.step)
        return system, tokenizer_of(run)
    path, _, arg = args.config.partition(":")
    config = runpy.run_path(path)["get_config"](arg or None)
    if args.dtype:
        config.model.update(param_dtype=args.dtype, dtype=args.dtype)
    if args.drafter:
        config.drafter.update(init_from=args.drafter)
    run = resolve(config)
    tok = tokenizer_of(run)
    return make_system(with_checkpoint_shapes(run, tok), tok), tok


def _best_ms(fn, repeats):
    import jax

    jax.block_until_ready(fn())
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
    return 1e3 * float(np.min(walls))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = _args(argv)
    os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"), args.xla_flags)))
    import jax
    import jax.numpy as jnp

    from mtp.decode.modes import Speculative
    from mtp.decode.shapes import cache_slots
    from mtp.model.packed_products import available as packed_available

    system, tok = system_from_args(args)
    b, k, ctx = args.batch, system.drafter_cfg.k, args.context
    tree_mode = Speculative(tree_nodes=args.tree_nodes, tree_beams=args.tree_beams, max_batch=0)
    new = 2 * args.new_tokens
    slots = cache_slots(ctx + new, system.max_len)  # the passes' cache: a chain call's
    # the loops' calls size their own caches; a tree's needs room for its slots too
    loops_system = system.with_max_len(
        cache_slots(ctx + new + tree_mode.extra_positions(new), system.max_len)
    )
    system = system.with_max_len(slots)
    cfg = system.main.cfg
    rng = np.random.default_rng(0)
    prompt_bt = jnp.asarray(rng.integers(0, tok.vocab_size, (b, ctx)), jnp.int32)
    runs = {}
    for products in (args.products or ("xla,packed" if packed_available() else "xla")).split(","):
        if products not in ("xla", "packed"):
            raise SystemExit(f"--products: xla or packed, not {products!r}")
        packed = products == "packed"
        if packed and not packed_available():
            raise SystemExit("--products=packed: needs one x86-64 CPU with AVX-512 and g++")
        runs[products] = _measure(system, loops_system, tok, prompt_bt, args, packed)
    cmd = "python benchmarks/pass_cost.py " + " ".join(shlex.quote(a) for a in argv)
    print(
        f"# pass cost: {args.workdir or args.config}: main d_model {cfg.d_model}, "
        f"{cfg.n_layers} layers, vocab {cfg.vocab_size}; drafter {system.drafter_cfg.kind}, "
        f"k={k}, draft vocab {system.drafter_cfg.draft_vocab or cfg.vocab_size}; batch {b}, "
        f"{ctx} tokens in a cache of {slots} slots; {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, "
        f"jax {jax.__version__}; weights {cfg.param_dtype}, compute {cfg.dtype}\n"
    )
    names = list(runs)
    head = " | ".join(f"{p} ms | / {p} main 1-token pass" for p in names)
    ratio = len(names) == 2
    print(f"| component | {head} |" + (" packed / xla |" if ratio else ""))
    print("|---" * (1 + 2 * len(names) + ratio) + "|")
    for name in runs[names[0]]:
        cells = []
        for p in names:
            v, base = runs[p].get(name), runs[p]["main, 1 token (slow's pass)"]
            cells.append("- | -" if v is None else f"{v:.2f} | {v / base:.2f}")
        row = f"| {name} | " + " | ".join(cells) + " |"
        if ratio and runs["packed"].get(name) is not None:
            row += f" {runs['packed'][name] / runs['xla'][name]:.2f} |"
        elif ratio:
            row += " - |"
        print(row)
    print(f"\nreproduce: {cmd}")
    return runs


def _measure(system, loops_system, tok, prompt_bt, args, packed: bool) -> dict[str, float]:
    """The components' best times (ms) with XLA's products or, `packed`, the packed kernel's
    (the single passes on weights packed once beforehand, the loops packing in their call)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mtp.decode.engine import Decoder
    from mtp.decode.modes import Speculative
    from mtp.decode.sampling import Sampling, choose
    from mtp.model.packed_products import pack, pack_all, pack_rows, product

    b, k, ctx, n = args.batch, system.drafter_cfg.k, args.context, args.tree_nodes
    tree = f"tree of {n} nodes"
    tree_mode = Speculative(tree_nodes=n, tree_beams=args.tree_beams, max_batch=0)
    new = 2 * args.new_tokens
    cfg = system.main.cfg
    graph, state = nnx.split(pack_all(nnx.clone(system)) if packed else system)

    @jax.jit
    def prefill(state):
        s = nnx.merge(graph, state)
        _, taps, cache = s.main_pass(prompt_bt, jnp.zeros((b,), jnp.int32), s.init_cache(b))
        return taps[:, -1], cache

    taps_bld, cache = prefill(state)
    pos_b = jnp.full((b,), ctx, jnp.int32)

    @jax.jit
    def main_one(state, cache):
        s = nnx.merge(graph, state)
        feed = jnp.zeros((b, 1), jnp.int32)
        return s.main_pass(feed, pos_b, cache, logits_at_b=jnp.zeros((b,), jnp.int32))[0]

    @functools.partial(jax.jit, static_argnums=2)
    def main_wide(state, cache, w):
        s = nnx.merge(graph, state)
        return s.main_pass(jnp.zeros((b, w), jnp.int32), pos_b, cache)[0]

    @jax.jit
    def drafter(state, taps_bld, cache, tables):
        s = nnx.merge(graph, state)
        pick = lambda logits_bu, j: choose(logits_bu, Sampling(), None)
        return s.draft(taps_bld, jnp.zeros((b,), jnp.int32), pick, cache, pos_b - 1, tables)[0]

    @jax.jit
    def tree_drafter(state, taps_bld, cache, tables):
        s = nnx.merge(graph, state)
        y0_b, m = jnp.zeros((b,), jnp.int32), args.tree_beams
        return s.draft_tree(taps_bld, y0_b, m, k, cache, pos_b - 1, tables)[1]

    tables = jax.jit(lambda state: nnx.merge(graph, state).tables())(state)  # once, as a call

    embed = system.main.embed.embedding[...]
    flat = nnx.to_flat_state(nnx.state(system.main, nnx.Param))
    kernels = [v[...] for path, v in flat if path[-1] == "kernel"]  # (in, out)
    widths = [w.shape[1] for w in kernels] + [embed.shape[0]]  # N of each product, the head's
    if packed:  # packed once, as a decoding call does before its loop
        kernels, embed = [pack(w) for w in kernels], pack_rows(embed)
    mm = (lambda x, w, n: product(x, w, n)) if packed else (lambda x, w, n: x @ w)
    in_dim = (lambda w: w.shape[1]) if packed else (lambda w: w.shape[0])

    @functools.partial(jax.jit, static_argnums=2)
    def products(kernels, embed, chained: bool):
        """Each 2-D weight of the main model times B vectors (the embedding as the tied head
        reads it), nothing else: one after the other (each input depends on the previous
        product, as in a pass) or independent (XLA may then merge or overlap them)."""
        x_bi = jnp.ones((b, max(in_dim(w) for w in kernels)), jnp.float32)
        out = jnp.zeros((), x_bi.dtype)
        for w, n in zip(kernels, widths, strict=False):
            y = mm(x_bi[:, : in_dim(w)] * (1 + out if chained else 1), w, n).sum() * 1e-9
            out = y if chained else out + y
        if not cfg.tie_embeddings:
            return out
        x_bd = x_bi[:, : cfg.d_model] * (1 + out if chained else 1)
        head = mm(x_bd, embed, widths[-1]) if packed else jnp.einsum("bd,vd->bv", x_bd, embed)
        return out + head.sum()

    r = args.repeats
    ms = {
        "main, 1 token (slow's pass)": _best_ms(lambda: main_one(state, cache), r),
        "main's weight products alone, one after the other": _best_ms(
            lambda: products(kernels, embed, True), r
        ),
        "main's weight products alone, independent": _best_ms(
            lambda: products(kernels, embed, False), r
        ),
        f"main, {k + 1} tokens (verification)": _best_ms(lambda: main_wide(state, cache, k + 1), r),
        f"drafter, {k} steps": _best_ms(lambda: drafter(state, taps_bld, cache, tables), r),
    }
    widths = {int(x) for x in args.widths.split(",") if x} | ({n + 1} if n else set())
    for w in sorted(widths - {1, k + 1}):
        ms[f"main, {w} tokens"] = _best_ms(lambda w=w: main_wide(state, cache, w), r)
    loops = [("slow", "slow"), ("speculative", Speculative(max_batch=0))]
    if n:
        ms[f"drafter, {tree} ({args.tree_beams} beams, depth {k})"] = _best_ms(
            lambda: tree_drafter(state, taps_bld, cache, tables), r
        )
        loops.append((tree, tree_mode))
    dec = Decoder(loops_system, tok.specials, packed=packed)
    prompts = [np.asarray(row) for row in np.asarray(prompt_bt)]
    for label, mode in loops:
        # a call's wall time less its prefill's, per loop pass (rows never stop)
        kw = dict(mode=mode, max_new_tokens=new, stop_id=-1)
        call = dec.prepare(prompts, **kw)
        prefill = dec.jits(call.slots)[0]
        dec.generate(prompts, **kw)
        runs = [dec.generate(prompts, **kw) for _ in range(max(3, r // 4))]
        wall_ms = 1e3 * np.min([x.wall_s for x in runs])
        prefill_ms = _best_ms(lambda p=prefill, c=call: p(dec.state, *c.prefill_args), r)
        ms[f"{label} loop, per pass"] = (wall_ms - prefill_ms) / (runs[0].batch_passes - 1)
    ms["speculative bookkeeping (loop - main - drafter)"] = (
        ms["speculative loop, per pass"]
        - ms[f"main, {k + 1} tokens (verification)"]
        - ms[f"drafter, {k} steps"]
    )
    if n:
        wide = ms[f"main, {k + 1} tokens (verification)" if n == k else f"main, {n + 1} tokens"]
        ms[f"{tree} bookkeeping (loop - main - drafter)"] = (
            ms[f"{tree} loop, per pass"]
            - wide
            - ms[f"drafter, {tree} ({args.tree_beams} beams, depth {k})"]
        )
    return ms


if __name__ == "__main__":
    main()
