"""Weight products of a few rows on the CPU, from weights packed ahead of time.

A decoding pass multiplies one row per sequence (slow) or k + 1 (a verification) by every
weight. XLA:CPU runs a one-row product as a matrix-vector product, but from two rows on it
runs general matrix kernels whose cost grows with the rows: on SmolLM2-135M (2 cores) a
5-token pass cost 1.5-1.7x a 1-token one. `packed_products.cc` reads weights packed ahead
of time, in tiles of 64 columns each one contiguous stream, and computes a tile for every
row before moving on, so the weights are read once whatever the rows: there a 5-token pass
costs 1.26x a 1-token one, and the 1-token pass 0.77x XLA's (docs/benchmarks.md, "Packed
weight products"). A `Decoder` packs its weights once, when it is made and at each
`set_weights` (an RL update), into a copy of the system that shares the weights (`pack_all`):
packing SmolLM2-135M takes about half a second, too long to repeat in every call.

Each output sums its K products in order whatever the rows beside it, so a row's logits
are bit-identical in a 1-token and a k + 1-token pass.

The kernel is compiled on first use with the system's C++ compiler against jaxlib's FFI
headers, into `$MTP_CACHE/packed_products/`. It runs on one CPU device with AVX-512 only;
elsewhere, or with `MTP_PACKED_PRODUCTS=0`, `available()` is False and every product is
XLA's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config.sources import cache_dir
from mtp.files import atomic_write

SOURCE = Path(__file__).with_name("packed_products.cc")
TARGET = "mtp_packed_product"
TILE = 64  # columns per packed tile
MAX_ROWS = 32  # rows per product the kernel takes; more go to XLA's matrix kernels
# weights packed from this size on: smaller ones sit in cache, where XLA's products cost less
# than a kernel call (a random 3 MB model decoded slower packed than with XLA's products)
MIN_BYTES = 1 << 18
_CXX = os.environ.get("CXX", "g++")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def _build() -> Path:
    """The kernel's shared library, compiled once per source, jaxlib and CPU."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + jax.__version__.encode() + " ".join(sorted(_cpu_flags())).encode()
    ).hexdigest()[:16]
    lib = cache_dir() / "packed_products" / key / "libmtp_packed_products.so"
    if not lib.exists():
        cmd = [_CXX, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
        cmd += [f"-I{jax.ffi.include_dir()}", str(SOURCE)]
        atomic_write(lib, lambda tmp: subprocess.run([*cmd, "-o", str(tmp)], check=True,
                                                     capture_output=True))  # fmt: skip
    return lib


@functools.cache
def available() -> bool:
    """Can products run on the packed kernel here (built and registered on first call)?"""
    if os.environ.get("MTP_PACKED_PRODUCTS", "1") == "0":
        return False
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return False
    if platform.machine() != "x86_64" or "avx512f" not in _cpu_flags() or not shutil.which(_CXX):
        return False
    try:
        handler = ctypes.cdll.LoadLibrary(str(_build())).MtpPackedProduct
    except (OSError, subprocess.CalledProcessError) as e:
        why = (getattr(e, "stderr", None) or str(e).encode())[-500:].decode(errors="replace")
        warnings.warn(f"packed products unavailable (XLA's run instead): {why}", stacklevel=2)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
    return True


def pack(w_kn: jax.Array) -> jax.Array:
    """(K, N) weights -> (ceil(N / 64), K, 64) tiles of 64 columns (the last one zero-padded)."""
    k, n = w_kn.shape
    w_kn = jnp.pad(w_kn, ((0, 0), (0, -n % TILE)))
    return w_kn.reshape(k, -1, TILE).transpose(1, 0, 2)


def pack_rows(w_nk: jax.Array) -> jax.Array:
    """The tiles of w_nk.T (a tied head's (V, D) embedding) without transposing it first."""
    n, k = w_nk.shape
    w_nk = jnp.pad(w_nk, ((0, -n % TILE), (0, 0)))
    return w_nk.reshape(-1, TILE, k).transpose(0, 2, 1)


def worth_packing(w: jax.Array) -> bool:
    """Are weights w float32 and at least `MIN_BYTES`?"""
    return w.dtype == jnp.float32 and w.nbytes >= MIN_BYTES


def fits(x_xk: jax.Array) -> bool:
    """Does the packed kernel take x (..., K) (float32, at most MAX_ROWS rows)?"""
    return x_xk.dtype == jnp.float32 and x_xk.size // x_xk.shape[-1] <= MAX_ROWS


def product(x_xk: jax.Array, w_tkc: jax.Array, n: int) -> jax.Array:
    """x (..., K) @ w (K, N) on the kernel, w packed by `pack` (T, K, 64); -> (..., N)."""
    t = w_tkc.shape[0]
    out = jax.ShapeDtypeStruct((*x_xk.shape[:-1], t * TILE), jnp.float32)
    y_xn = jax.ffi.ffi_call(TARGET, out)(x_xk, w_tkc)
    return y_xn if n == t * TILE else y_xn[..., :n]


class Packed(nnx.Variable):
    """A packed copy of a weight, made for decoding (`pack_all`); never trained or saved."""


@runtime_checkable
class Packs(Protocol):
    """A module with weights that `pack_all` may pack: `pack()` gives it their `Packed`
    copies, which its products then use for inputs that `fits`."""

    def pack(self) -> None: ...


class Dense(nnx.Linear):
    """`nnx.Linear`, same parameters, whose product runs on the packed kernel once packed."""

    packed: Packed | None = None

    def pack(self) -> None:
        if worth_packing(self.kernel[...]):
            self.packed = Packed(pack(self.kernel[...]))

    def __call__(self, x_xk):
        if self.packed is None or not fits(x_xk):
            return super().__call__(x_xk)
        y_xn = product(x_xk, self.packed[...], self.out_features)
        return y_xn if self.bias is None else y_xn + self.bias[...]


def pack_all(module: nnx.Module) -> nnx.Module:
    """Packs the weights of every `Packs` module in `module` (in place; returns it)."""
    for _, m in module.iter_modules():
        if isinstance(m, Packs):
            m.pack()
    return module
