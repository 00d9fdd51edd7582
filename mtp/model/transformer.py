"""Main model: a decoder-only transformer that exposes its residual stream.

Pre-norm RMSNorm blocks, RoPE, grouped-query attention through
`jax.nn.dot_product_attention`, SwiGLU MLP, optional tied embeddings and
learned registers. The family fields of `ModelConfig` cover pretrained checkpoints (see
mtp.model.convert): an explicit head dim, q/k/v biases (Qwen2), `(1 + w)` norms, scaled
embeddings and GeGLU (Gemma), Llama 3 RoPE scaling. `__call__` returns logits, the hidden
states of the tapped blocks (what the drafter eavesdrops on) and, when given one, the
updated KV cache.

KV cache: one `{'k', 'v'}` pair per layer, each `(B, G, S, H)` (G key/value heads) with
`S = n_registers + max_len` slots. Token at logical position `p` lives in slot
`n_registers + p`. A cached pass feeds tokens at consecutive slots; each attends to
the cached slots before the first of them and to the fed tokens up to itself, and
only then are they written, so rows of a batch may sit at different positions and
stale slots past a row's position (rejected drafts) are never read. A prefill of
many tokens and later steps of 1..k+1 tokens give the same outputs as one full
forward.

A cached pass may feed a draft tree (`FedTree`, speculative decoding with
trees): its tokens take consecutive slots from the first one's, but each sits
at the RoPE position of its depth and attends to the cached past and to its
own ancestors only; `move_slots` then moves the accepted path's keys and values
to the slots of its positions.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import ModelConfig
from mtp.model.packed_products import (
    Dense,
    Packed,
    fits,
    pack_rows,
    product,
    worth_packing,
)

Cache = tuple[dict[str, jax.Array], ...]


class FedTree(NamedTuple):
    """A draft tree fed in one cached pass of T tokens, the first the root: token t lies
    `depth_bt` (B, T) below the root (its RoPE position is the root's + depth) and attends
    to the cached slots before the root's and to the fed tokens t' with `anc_btt[b, t, t']`
    (its ancestors and itself)."""

    depth_bt: jax.Array
    anc_btt: jax.Array


def rope_positions(slot_bt, tree: FedTree | None = None):
    """(B, T) RoPE positions of fed tokens at consecutive slots slot_bt (B, T): the slots
    themselves, or in a draft tree the root's plus each token's depth."""
    return slot_bt if tree is None else slot_bt[:, :1] + tree.depth_bt


def fed_mask(slot_bt, tree: FedTree | None = None):
    """(B, T, T) bool: which fed tokens each fed token reads (itself and those before it at
    consecutive slots, or in a draft tree its ancestors and itself)."""
    b, t = slot_bt.shape
    return jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t)) if tree is None else tree.anc_btt


def joint_softmax(a_xs, b_xu):
    """One softmax over the last axes of two logit arrays (..., S) and (..., U) as if they
    were concatenated, returned as its two parts (float32), without the concatenation: an
    attention over two memories (a cache and the fed tokens, a context and a draft chain)."""
    top_x1 = jnp.maximum(a_xs.max(-1, keepdims=True), b_xu.max(-1, keepdims=True))
    a_xs, b_xu = jnp.exp(a_xs - top_x1), jnp.exp(b_xu - top_x1)
    sum_x1 = a_xs.sum(-1, keepdims=True) + b_xu.sum(-1, keepdims=True)
    return a_xs / sum_x1, b_xu / sum_x1


def cached_attention(q_btnh, k_btgh, v_btgh, layer: dict[str, jax.Array], slot_bt, fed_btt):
    """Grouped-query attention of T fed tokens (queries (B, T, N, H), keys and values
    (B, T, G, H)) at consecutive slots from slot_bt[:, 0]: over the cache's slots before
    the first fed one (`layer` {'k', 'v'} (B, G, S, H), key/value-head major) and over the
    fed tokens `fed_btt` lets each read; (B, T, N, H).

    The cache is read as it was before this pass (its slots from slot_bt[:, 0] on are stale:
    rejected drafts, padding) and written after (`write_slots`), so no op reads a buffer that
    is being updated in place; XLA on CPU copied every layer's cache in every pass of the
    decoding loop otherwise. `jax.nn.dot_product_attention` takes keys as (B, S, G, H),
    which made XLA copy the cache to head-major order instead. Both products batch over
    (B, G) as the cache lies; a group's N / G query heads and the T fed tokens share one row
    axis M = T * N / G. Logits and softmax in float32, as `jax.nn.dot_product_attention`."""
    b, t, n, h = q_btnh.shape
    k_bgsh, v_bgsh = layer["k"], layer["v"]
    g, s, q = k_bgsh.shape[1], k_bgsh.shape[2], n // k_bgsh.shape[1]
    q_bgmh = q_btnh.reshape(b, t, g, q, h).transpose(0, 2, 1, 3, 4).reshape(b, g, t * q, h)
    f32 = jnp.float32
    # keys first: XLA on CPU ran 'bgmh,bgsh->bgms' 2x slower at T = 1
    past_bgsm = jnp.einsum(
        "bgsh,bgmh->bgsm", k_bgsh, q_bgmh.astype(k_bgsh.dtype), preferred_element_type=f32
    )
    fed_bgmu = jnp.einsum(
        "bugh,bgmh->bgmu", k_btgh.astype(k_bgsh.dtype), q_bgmh.astype(k_bgsh.dtype),
        preferred_element_type=f32,
    )  # fmt: skip
    past_b1ms = (jnp.arange(s)[None, :] < slot_bt[:, :1])[:, None, None, :]
    fed_b1mu = jnp.broadcast_to(fed_btt[:, :, None], (b, t, q, t)).reshape(b, 1, t * q, t)
    low = jnp.finfo(f32).min
    past_bgms, fed_bgmu = joint_softmax(
        jnp.where(past_b1ms, past_bgsm.swapaxes(2, 3) * h**-0.5, low),
        jnp.where(fed_b1mu, fed_bgmu * h**-0.5, low),
    )
    vdt = v_bgsh.dtype
    out_bgmh = jnp.einsum(
        "bgms,bgsh->bgmh", past_bgms.astype(vdt), v_bgsh, preferred_element_type=f32
    ) + jnp.einsum(
        "bgmu,bugh->bgmh", fed_bgmu.astype(vdt), v_btgh.astype(vdt), preferred_element_type=f32
    )  # fmt: skip
    out_bgmh = out_bgmh.astype(q_btnh.dtype)
    return out_bgmh.reshape(b, g, t, q, h).transpose(0, 2, 1, 3, 4).reshape(b, t, n, h)


def write_slots(layer: dict[str, jax.Array], k_btgh, v_btgh, slot_bt) -> dict[str, jax.Array]:
    """One layer's cache `{'k', 'v'}` (B, G, S, H) with keys and values (B, T, G, H) written at
    slots slot_bt (B, T) (past the cache: dropped)."""
    rows_b1 = jnp.arange(slot_bt.shape[0])[:, None]
    write = lambda x_bgsh, x_btgh: x_bgsh.at[rows_b1, :, slot_bt].set(
        x_btgh.astype(x_bgsh.dtype), mode="drop"
    )
    return {"k": write(layer["k"], k_btgh), "v": write(layer["v"], v_btgh)}


def move_slots(cache: Cache, src_bn, dst_bn) -> Cache:
    """The cache with the keys and values of slots src_bn (B, N) copied to slots dst_bn (B, N)
    of the same rows (all read before any is written; a dst past the cache: not moved)."""
    rows_b1 = jnp.arange(src_bn.shape[0])[:, None]

    def move(x_bgsh):
        return x_bgsh.at[rows_b1, :, dst_bn].set(x_bgsh[rows_b1, :, src_bn], mode="drop")

    return tuple({name: move(x) for name, x in layer.items()} for layer in cache)


def rope_freqs(h: int, base: float, scaling: tuple[float, ...] = ()) -> jax.Array:
    """Inverse frequencies (H/2,) float32; `scaling` = Llama 3's (factor, low_freq_factor,
    high_freq_factor, original_max_len): long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between (as transformers' `_compute_llama3_parameters`)."""
    freqs_f = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    if not scaling:
        return freqs_f
    factor, low, high, old_len = scaling
    wavelen_f = 2 * jnp.pi / freqs_f
    scaled_f = jnp.where(wavelen_f > old_len / low, freqs_f / factor, freqs_f)
    smooth_f = (old_len / wavelen_f - low) / (high - low)
    smoothed_f = (1 - smooth_f) * scaled_f / factor + smooth_f * scaled_f
    medium_f = (wavelen_f >= old_len / high) & (wavelen_f <= old_len / low)
    return jnp.where(medium_f, smoothed_f, scaled_f)


def rope(x_btnh: jax.Array, pos_bt: jax.Array, freqs_f: jax.Array) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half form; freqs_f (H/2,)."""
    ang_btf = pos_bt[..., None].astype(jnp.float32) * freqs_f  # (B, T, H/2)
    sin, cos = jnp.sin(ang_btf)[:, :, None], jnp.cos(ang_btf)[:, :, None]  # (B, T, 1, H/2)
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt, d, h = jnp.dtype(cfg.dtype), cfg.d_model, cfg.head_dim
        kw = dict(dtype=dt, param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.cfg = cfg
        self.q = Dense(d, cfg.n_heads * h, use_bias=cfg.qkv_bias, **kw)
        self.kv = Dense(d, 2 * cfg.n_kv_heads * h, use_bias=cfg.qkv_bias, **kw)  # [k | v]
        self.o = Dense(cfg.n_heads * h, d, use_bias=False, **kw)

    def project(self, x_btd, rope_bt):
        """Queries (B, T, N, H), keys and values (B, T, G, H) of inputs x (B, T, D) at RoPE
        positions rope_bt (B, T)."""
        cfg = self.cfg
        b, t, _ = x_btd.shape
        q_btnh = self.q(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k_btgh, v_btgh = jnp.split(
            self.kv(x_btd).reshape(b, t, 2 * cfg.n_kv_heads, cfg.head_dim), 2, axis=2
        )
        freqs_f = rope_freqs(cfg.head_dim, cfg.rope_base, cfg.rope_scaling)
        return rope(q_btnh, rope_bt, freqs_f), rope(k_btgh, rope_bt, freqs_f), v_btgh

    def __call__(self, x_btd, slot_bt, cache=None, tree: FedTree | None = None, fresh=False):
        """`fresh`: the cache holds nothing before the fed tokens but the registers (a prefill
        from position 0), so only the registers' slots are read, not all S."""
        b, t, _ = x_btd.shape
        r = self.cfg.n_registers
        q_btnh, k_btgh, v_btgh = self.project(x_btd, rope_positions(slot_bt, tree))
        if cache is None or (fresh and not r):  # nothing cached to read: plain causal attention
            out_btnh = jax.nn.dot_product_attention(q_btnh, k_btgh, v_btgh, is_causal=True)
        else:  # attend to the cached past and the fed tokens
            past = {name: x[:, :, :r] for name, x in cache.items()} if fresh else cache
            fed_btt = fed_mask(slot_bt, tree)
            out_btnh = cached_attention(q_btnh, k_btgh, v_btgh, past, slot_bt, fed_btt)
        if cache is not None:  # then write the fed tokens
            cache = write_slots(cache, k_btgh, v_btgh, slot_bt)
        return self.o(out_btnh.reshape(b, t, -1)), cache


class SwiGLU(nnx.Module):
    """Gated MLP: down(act(gate) * up), act SiLU (SwiGLU) or tanh GELU (GeGLU, `mlp_act`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt, rngs=rngs)
        self.gate_up = Dense(cfg.d_model, 2 * cfg.ff_dim, **kw)  # [gate | up]
        self.down = Dense(cfg.ff_dim, cfg.d_model, **kw)
        self.gelu = cfg.mlp_act == "gelu_tanh"

    def __call__(self, x_btd):
        gate, up = jnp.split(self.gate_up(x_btd), 2, axis=-1)  # (B, T, F) each
        act = jax.nn.gelu(gate, approximate=True) if self.gelu else jax.nn.silu(gate)
        return self.down(act * up)


class PlusOneRMSNorm(nnx.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + scale) in float32; `scale` stored as in HF (zeros)."""

    def __init__(self, d: int, epsilon: float, dtype, param_dtype):
        self.scale = nnx.Param(jnp.zeros((d,), param_dtype))
        self.epsilon, self.dtype = epsilon, dtype

    def __call__(self, x_btd):
        x_btd32 = x_btd.astype(jnp.float32)
        ms_bt1 = jnp.mean(x_btd32 * x_btd32, axis=-1, keepdims=True)
        y_btd = x_btd32 * jax.lax.rsqrt(ms_bt1 + self.epsilon)
        return (y_btd * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype)


def rms_norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The family's RMSNorm over d_model: scale by w (nnx.RMSNorm) or by 1 + w (Gemma)."""
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if cfg.norm_plus_one:
        return PlusOneRMSNorm(cfg.d_model, cfg.norm_eps, dt, pdt)
    return nnx.RMSNorm(cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attn_norm = rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = rms_norm(cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_btd, slot_bt, cache=None, tree: FedTree | None = None, fresh=False):
        a_btd, cache = self.attn(self.attn_norm(x_btd), slot_bt, cache, tree, fresh)
        x_btd = x_btd + a_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), cache


class Transformer(nnx.Module):
    """Decoder-only LM returning `(logits_btv, taps_btld, cache)`."""

    packed_head: Packed | None = None  # a tied head's packed copy (`pack`)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = rms_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.head = Dense(
                cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs
            )
        if cfg.n_registers:
            init = nnx.initializers.normal(0.02)
            self.registers = nnx.Param(init(rngs.params(), (cfg.n_registers, cfg.d_model), pdt))
        if cfg.use_urgency:
            self.urgency = nnx.Param(jnp.zeros((cfg.d_model,), pdt))

    def _embed(self, tokens_bt, urgency_b):
        x_btd = self.embed(tokens_bt)
        if self.cfg.embed_scale:  # Gemma: sqrt(d_model) rounded to the compute dtype, as in HF
            x_btd = x_btd * jnp.asarray(self.cfg.d_model**0.5, x_btd.dtype)
        if self.cfg.use_urgency:
            u_b = jnp.zeros(tokens_bt.shape[:1]) if urgency_b is None else urgency_b
            x_btd = x_btd + (u_b[:, None, None] * self.urgency[...]).astype(x_btd.dtype)
        return x_btd

    def _blocks(self, x_btd, slot_bt, cache, tree=None, fresh=False):
        taps = {t: None for t in self.cfg.tap_layers}
        new_cache = []
        for i, block in enumerate(self.blocks):
            layer = None if cache is None else cache[i]
            x_btd, layer_cache = block(x_btd, slot_bt, layer, tree, fresh)
            new_cache.append(layer_cache)
            if i in taps:
                taps[i] = x_btd
        taps_btld = jnp.stack([taps[t] for t in self.cfg.tap_layers], axis=2)
        return x_btd, taps_btld, (None if cache is None else tuple(new_cache))

    def pack(self) -> None:
        embed_vd = self.embed.embedding[...]
        if self.cfg.tie_embeddings and worth_packing(embed_vd):
            self.packed_head = Packed(pack_rows(embed_vd))

    def logits(self, x_btd) -> jax.Array:
        x_btd = self.final_norm(x_btd)
        if self.packed_head is not None and fits(x_btd):
            return product(x_btd, self.packed_head[...], self.cfg.vocab_size)
        if self.cfg.tie_embeddings:  # contracted as stored: no transposed copy of the table
            embed_vd = self.embed.embedding[...].astype(x_btd.dtype)
            return jnp.einsum("btd,vd->btv", x_btd, embed_vd).astype(jnp.float32)
        return self.head(x_btd).astype(jnp.float32)

    def __call__(
        self, tokens_bt, positions_bt=None, cache: Cache | None = None, urgency_b=None, *,
        tree: FedTree | None = None, logits_at_b=None, fresh: bool = False,
    ):  # fmt: skip
        """tokens_bt int (B, T); positions_bt logical positions (B, T), default 0..T-1.

        Without a cache: a full causal forward over the tokens (registers
        prepended). With a cache (see `init_cache`): the tokens are written at
        their positions and attend to everything cached before them; `tree`: they
        form a draft tree (consecutive positions give their slots, `FedTree` the rest);
        `fresh`: they start at position 0 of an empty cache (a prefill: no slot is read but
        the registers').
        Returns logits (B, T, V) float32, or (B, 1, V) at fed token `logits_at_b` (B,) of
        each row when given (the LM head over one place: a prefill, a pass whose other
        logits nobody reads), taps (B, T, n_taps, D) and the cache.
        """
        cfg, r = self.cfg, self.cfg.n_registers
        b, t = tokens_bt.shape
        if tree is not None and cache is None:
            raise ValueError("a draft tree is fed in a cached pass only")
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
        x_btd = self._embed(tokens_bt, urgency_b)
        if cache is None and r:
            regs = jnp.broadcast_to(self.registers[...].astype(x_btd.dtype), (b, r, cfg.d_model))
            x_btd = jnp.concatenate([regs, x_btd], axis=1)  # (B, R + T, D)
            slot_bt = jnp.broadcast_to(jnp.arange(r + t), (b, r + t))
        else:
            slot_bt = positions_bt + r
        x_btd, taps_btld, cache = self._blocks(x_btd, slot_bt, cache, tree, fresh)
        x_btd, taps_btld = x_btd[:, -t:], taps_btld[:, -t:]  # drop register outputs
        chex.assert_shape(taps_btld, (b, t, len(cfg.taps), cfg.d_model))
        if logits_at_b is not None:
            x_btd = jnp.take_along_axis(x_btd, logits_at_b[:, None, None], axis=1)
        return self.logits(x_btd), taps_btld, cache

    def init_cache(self, batch: int, dtype=None) -> Cache:
        """Empty cache for `batch` rows of up to `max_len` tokens; registers pre-filled."""
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, cfg.n_registers + cfg.max_len, cfg.head_dim)
        dt = dtype or jnp.dtype(cfg.dtype)
        cache = tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in self.blocks)
        if cfg.n_registers:
            regs = jnp.broadcast_to(self.registers[...], (batch, cfg.n_registers, cfg.d_model))
            slot_bt = jnp.broadcast_to(jnp.arange(cfg.n_registers), regs.shape[:2])
            _, _, cache = self._blocks(regs.astype(jnp.dtype(cfg.dtype)), slot_bt, cache)
        return cache
