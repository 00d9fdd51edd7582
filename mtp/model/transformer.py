"""Main model: a decoder-only transformer that exposes its residual stream.

Pre-norm RMSNorm blocks, RoPE, grouped-query attention through
`jax.nn.dot_product_attention`, SwiGLU MLP, optional tied embeddings and
learned registers. `__call__` returns logits, the hidden states of the tapped
blocks (what the drafter eavesdrops on) and, when given one, the updated KV
cache.

KV cache: one `{'k', 'v'}` pair per layer, each `(B, S, G, H)` (G key/value heads) with
`S = n_registers + max_len` slots. Token at logical position `p` lives in slot
`n_registers + p`; a query at slot `q` attends to every slot `<= q`, so rows of
a batch may sit at different positions and stale slots past a row's position
(rejected drafts) are never read. A prefill of many tokens and later steps of
1..k+1 tokens give the same outputs as one full forward.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import ModelConfig

Cache = tuple[dict[str, jax.Array], ...]


def rope(x_btnh: jax.Array, pos_bt: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half form."""
    h = x_btnh.shape[-1]
    freqs_f = base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # (H/2,)
    ang_btf = pos_bt[..., None].astype(jnp.float32) * freqs_f  # (B, T, H/2)
    sin, cos = jnp.sin(ang_btf)[:, :, None], jnp.cos(ang_btf)[:, :, None]  # (B, T, 1, H/2)
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dt, d, h = jnp.dtype(cfg.dtype), cfg.d_model, cfg.head_dim
        kw = dict(use_bias=False, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.cfg = cfg
        self.q = nnx.Linear(d, cfg.n_heads * h, **kw)
        self.kv = nnx.Linear(d, 2 * cfg.n_kv_heads * h, **kw)
        self.o = nnx.Linear(cfg.n_heads * h, d, **kw)

    def __call__(self, x_btd, slot_bt, cache=None):
        cfg = self.cfg
        b, t, _ = x_btd.shape
        q_btnh = self.q(x_btd).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k_btgh, v_btgh = jnp.split(
            self.kv(x_btd).reshape(b, t, 2 * cfg.n_kv_heads, cfg.head_dim), 2, axis=2
        )
        q_btnh = rope(q_btnh, slot_bt, cfg.rope_base)
        k_btgh = rope(k_btgh, slot_bt, cfg.rope_base)
        if cache is None:  # training / full forward: plain causal attention
            out_btnh = jax.nn.dot_product_attention(q_btnh, k_btgh, v_btgh, is_causal=True)
        else:  # write the new keys at their slots, attend to every slot <= own slot
            rows_b1 = jnp.arange(b)[:, None]
            k_bsgh = cache["k"].at[rows_b1, slot_bt].set(k_btgh.astype(cache["k"].dtype))
            v_bsgh = cache["v"].at[rows_b1, slot_bt].set(v_btgh.astype(cache["v"].dtype))
            cache = {"k": k_bsgh, "v": v_bsgh}
            s = k_bsgh.shape[1]
            mask_b1ts = jnp.arange(s)[None, None, None, :] <= slot_bt[:, None, :, None]
            out_btnh = jax.nn.dot_product_attention(
                q_btnh, k_bsgh.astype(q_btnh.dtype), v_bsgh.astype(q_btnh.dtype), mask=mask_b1ts
            )
        return self.o(out_btnh.reshape(b, t, -1)), cache


class SwiGLU(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
        self.gate_up = nnx.Linear(cfg.d_model, 2 * cfg.ff_dim, **kw)
        self.down = nnx.Linear(cfg.ff_dim, cfg.d_model, **kw)

    def __call__(self, x_btd):
        gate, up = jnp.split(self.gate_up(x_btd), 2, axis=-1)  # (B, T, F) each
        return self.down(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        kw = dict(epsilon=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)
        self.attn_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs, **kw)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(cfg.d_model, rngs=rngs, **kw)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x_btd, slot_bt, cache=None):
        a_btd, cache = self.attn(self.attn_norm(x_btd), slot_bt, cache)
        x_btd = x_btd + a_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), cache


class Transformer(nnx.Module):
    """Decoder-only LM returning `(logits_btv, taps_btld, cache)`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = jnp.dtype(cfg.dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dt, param_dtype=jnp.float32, rngs=rngs
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = nnx.RMSNorm(
            cfg.d_model, epsilon=cfg.norm_eps, dtype=dt, param_dtype=jnp.float32, rngs=rngs
        )
        if not cfg.tie_embeddings:
            self.head = nnx.Linear(
                cfg.d_model, cfg.vocab_size, use_bias=False, dtype=dt,
                param_dtype=jnp.float32, rngs=rngs,
            )  # fmt: skip
        if cfg.n_registers:
            init = nnx.initializers.normal(0.02)
            self.registers = nnx.Param(init(rngs.params(), (cfg.n_registers, cfg.d_model)))
        if cfg.use_urgency:
            self.urgency = nnx.Param(jnp.zeros((cfg.d_model,), jnp.float32))

    def _embed(self, tokens_bt, urgency_b):
        x_btd = self.embed(tokens_bt)
        if self.cfg.use_urgency:
            u_b = jnp.zeros(tokens_bt.shape[:1]) if urgency_b is None else urgency_b
            x_btd = x_btd + (u_b[:, None, None] * self.urgency[...]).astype(x_btd.dtype)
        return x_btd

    def _blocks(self, x_btd, slot_bt, cache):
        taps = {t: None for t in self.cfg.tap_layers}
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_btd, layer_cache = block(x_btd, slot_bt, None if cache is None else cache[i])
            new_cache.append(layer_cache)
            if i in taps:
                taps[i] = x_btd
        taps_btld = jnp.stack([taps[t] for t in self.cfg.tap_layers], axis=2)
        return x_btd, taps_btld, (None if cache is None else tuple(new_cache))

    def logits(self, x_btd) -> jax.Array:
        x_btd = self.final_norm(x_btd)
        if self.cfg.tie_embeddings:
            return self.embed.attend(x_btd).astype(jnp.float32)
        return self.head(x_btd).astype(jnp.float32)

    def __call__(self, tokens_bt, positions_bt=None, cache: Cache | None = None, urgency_b=None):
        """tokens_bt int (B, T); positions_bt logical positions (B, T), default 0..T-1.

        Without a cache: a full causal forward over the tokens (registers
        prepended). With a cache (see `init_cache`): the tokens are written at
        their positions and attend to everything cached before them.
        Returns logits (B, T, V) float32, taps (B, T, n_taps, D), cache.
        """
        cfg, r = self.cfg, self.cfg.n_registers
        b, t = tokens_bt.shape
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
        x_btd = self._embed(tokens_bt, urgency_b)
        if cache is None and r:
            regs = jnp.broadcast_to(self.registers[...].astype(x_btd.dtype), (b, r, cfg.d_model))
            x_btd = jnp.concatenate([regs, x_btd], axis=1)  # (B, R + T, D)
            slot_bt = jnp.broadcast_to(jnp.arange(r + t), (b, r + t))
        else:
            slot_bt = positions_bt + r
        x_btd, taps_btld, cache = self._blocks(x_btd, slot_bt, cache)
        x_btd, taps_btld = x_btd[:, -t:], taps_btld[:, -t:]  # drop register outputs
        chex.assert_shape(taps_btld, (b, t, len(cfg.taps), cfg.d_model))
        return self.logits(x_btd), taps_btld, cache

    def init_cache(self, batch: int, dtype=None) -> Cache:
        """Empty cache for `batch` rows of up to `max_len` tokens; registers pre-filled."""
        cfg = self.cfg
        shape = (batch, cfg.n_registers + cfg.max_len, cfg.n_kv_heads, cfg.head_dim)
        dt = dtype or jnp.dtype(cfg.dtype)
        cache = tuple({"k": jnp.zeros(shape, dt), "v": jnp.zeros(shape, dt)} for _ in self.blocks)
        if cfg.n_registers:
            regs = jnp.broadcast_to(self.registers[...], (batch, cfg.n_registers, cfg.d_model))
            slot_bt = jnp.broadcast_to(jnp.arange(cfg.n_registers), regs.shape[:2])
            _, _, cache = self._blocks(regs.astype(jnp.dtype(cfg.dtype)), slot_bt, cache)
        return cache
