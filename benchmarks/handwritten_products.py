r"""Are XLA:CPU's small matrix products the floor of a decoding pass? Against a hand-written kernel.

    python benchmarks/handwritten_products.py            # SmolLM2-135M's shapes

A decoding pass multiplies one (slow) or k + 1 (verification) rows by every weight of the
main model, one product after the other. This times such a chain of products of the shapes
of `--layers` transformer layers (q, k/v, o, gate/up, down), each input depending on the
previous output as in a pass, two ways on the same bytes: XLA's (`x @ w`, w stored
(in, out) as `nnx.Linear` holds it) and a hand-written AVX-512 kernel
(`benchmarks/rows_matmul.cc`, an XLA FFI custom call that reads each weight row once,
contiguously, w stored (out, in) as llama.cpp holds it, split over two threads). It is
compiled here with g++ and needs an x86-64 CPU with AVX-512; it is a yardstick, not part
of mtp. Prints, per row count, both times, their ratio and the read rate, and the command.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

KERNEL = Path(__file__).with_name("rows_matmul.cc")


def build_kernel(out_dir: Path) -> Path:
    """Compiles `rows_matmul.cc` against jaxlib's FFI headers; returns the shared library."""
    lib = out_dir / "librows_matmul.so"
    cmd = ["g++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
    cmd += [f"-I{jax.ffi.include_dir()}", str(KERNEL), "-o", str(lib)]
    subprocess.run(cmd, check=True)
    return lib


def register(lib: Path) -> None:
    handler = ctypes.cdll.LoadLibrary(str(lib)).RowsMatmul
    jax.ffi.register_ffi_target("rows_matmul", jax.ffi.pycapsule(handler), platform="cpu")


def handwritten(x_mk, w_nk):
    """x (M, K) @ w (N, K)^T by the kernel."""
    out = jax.ShapeDtypeStruct((x_mk.shape[0], w_nk.shape[0]), x_mk.dtype)
    return jax.ffi.ffi_call("rows_matmul", out)(x_mk, w_nk)


def layer_shapes(d, q_width, kv_width, ff, layers):
    """(in, out) of each product of `layers` pre-norm layers: q, k/v, o, gate/up, down."""
    one = [(d, q_width), (d, kv_width), (q_width, d), (d, 2 * ff), (ff, d)]
    return one * layers


def _chain(mm, weights, x_mi):
    """Each product's input scaled by the previous output's sum: none can start early."""
    out = jnp.zeros((), x_mi.dtype)
    for w in weights:
        k = w.shape[1] if mm is handwritten else w.shape[0]
        out = mm(x_mi[:, :k] * (1 + out), w).sum() * 1e-9
    return out


def _best_ms(fn, repeats):
    jax.block_until_ready(fn())
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        walls.append(time.perf_counter() - t0)
    return 1e3 * min(walls)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d_model", type=int, default=576)
    p.add_argument("--q_width", type=int, default=576, help="query heads x head dim")
    p.add_argument("--kv_width", type=int, default=384, help="2 x key/value heads x head dim")
    p.add_argument("--ff", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--rows", default="1,5", help="rows multiplied at once (1: slow; 5: k = 4)")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        register(build_kernel(Path(tmp)))
    rng = np.random.default_rng(0)
    shapes = layer_shapes(args.d_model, args.q_width, args.kv_width, args.ff, args.layers)
    w_io = [np.asarray(rng.standard_normal(s) * 0.05, np.float32) for s in shapes]
    xla_w = [jnp.asarray(w) for w in w_io]
    own_w = [jnp.asarray(w.T.copy()) for w in w_io]  # (out, in)
    mb = sum(w.nbytes for w in w_io) / 1e6
    x_mi = rng.standard_normal((8, max(s[0] for s in shapes))).astype(np.float32)
    chain = jax.jit(_chain, static_argnums=0)
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(x_mi[:m])
        for w, ref in zip(own_w[:5], w_io[:5], strict=True):  # same products, float32 rounding
            got, want = handwritten(x[:, : ref.shape[0]], w), x[:, : ref.shape[0]] @ ref
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        xla = _best_ms(functools.partial(chain, jnp.matmul, xla_w, x), args.repeats)
        own = _best_ms(functools.partial(chain, handwritten, own_w, x), args.repeats)
        rows.append((m, xla, own))
    print(
        f"# {len(shapes)} products one after the other, {mb:.0f} MB of float32 weights; "
        f"{jax.devices()[0].device_kind}, jax {jax.__version__}, best of {args.repeats}\n"
    )
    print("| rows | XLA ms | hand-written ms | hand-written / XLA | XLA GB/s |")
    print("|---|---|---|---|---|")
    for m, xla, own in rows:
        print(f"| {m} | {xla:.2f} | {own:.2f} | {own / xla:.2f} | {mb / xla:.1f} |")
    print("\nreproduce: python benchmarks/handwritten_products.py " + shlex.join(argv))
    return rows


if __name__ == "__main__":
    main()
