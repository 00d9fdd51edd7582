"""What a drafter reads of the main model: its taps fused into one vector per position
(`TapFusion`), the taps before a teacher-forced row (`Past`), their training-time noise
(`with_noise`), and the teacher-forced attention of a drafter block over every
position's draft chain and the context (`context_block`, for `drafter.context`). Shapes:
B rows, T positions, L taps, D the main model's width, d the drafter's, K draft steps, P
past slots."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import ModelConfig
from mtp.model.packed_products import Dense
from mtp.model.transformer import Block, joint_softmax


class Past(NamedTuple):
    """The taps of the positions before a teacher-forced row (e.g. a window's prompt) that a
    drafter reading the context attends to: taps (B, P, L, D), right-aligned so that slot
    P - 1 is the position just before the row's first, and which slots hold one (B, P)."""

    taps_bpld: jax.Array
    valid_bp: jax.Array


class TapFusion(nnx.Module):
    """Norms each tapped layer and projects their concatenation to the drafter width."""

    def __init__(self, main: ModelConfig, d: int, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(main.param_dtype)
        self.norm = nnx.RMSNorm(main.d_model, epsilon=main.norm_eps, param_dtype=pdt, rngs=rngs)
        n_in = len(main.taps) * main.d_model
        self.proj = Dense(n_in, d, use_bias=False, param_dtype=pdt, rngs=rngs)

    def __call__(self, taps_btld):
        b, t = taps_btld.shape[:2]
        return self.proj(self.norm(taps_btld.astype(jnp.float32)).reshape(b, t, -1))  # (B, T, d)


def with_noise(taps_btld, scale: float, key):
    """Taps (B, T, L, D) plus uniform noise in +-scale times each tap's RMS over D (EAGLE's
    feature augmentation): a drafter trained on few rows then leans less on any one
    coordinate of the main model's features. Training only; decoding reads them as they are."""
    x = taps_btld.astype(jnp.float32)
    rms_btl1 = jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True))
    u = jax.random.uniform(key, x.shape, jnp.float32, -1.0, 1.0)
    return (x + scale * rms_btl1 * u).astype(taps_btld.dtype)


def context_block(block: Block, x_btkd, m_btd, past_m_bpd=None, valid_bp=None):
    """A drafter block over every position's draft chain at once (teacher forcing) that reads
    the context: step j of the chain at t attends to the context vectors m_s (B, T, d) at
    s <= t and to its own steps <= j, as decoding's steps read the context cache up to the
    root and their own slots after it; with `past_m_bpd` (B, P, d) also to the context
    vectors of the P positions before the row, where `valid_bp` (B, P). RoPE positions: past
    slot p at p, row position t at P + t, step j of its chain at P + t + 1 + j. (B, T, K, d)."""
    b, t, k, d = x_btkd.shape
    attn, n, h = block.attn, block.attn.cfg.n_heads, block.attn.cfg.head_dim
    if block.attn.cfg.n_kv_heads != n:
        raise ValueError("context_block: the drafter's blocks have as many key heads as queries")
    p = 0 if past_m_bpd is None else past_m_bpd.shape[1]
    if p:  # memory: the past's slots, then the row's
        m_btd = jnp.concatenate([past_m_bpd, m_btd], axis=1)
        seen_bs = jnp.concatenate([valid_bp, jnp.ones((b, t), bool)], axis=1)
    else:
        seen_bs = jnp.ones((b, t), bool)
    s = p + t
    chain_x = jnp.broadcast_to(
        (p + jnp.arange(t)[:, None] + 1 + jnp.arange(k)).reshape(-1), (b, t * k)
    )
    q_xnh, kc_xnh, vc_xnh = attn.project(block.attn_norm(x_btkd).reshape(b, t * k, d), chain_x)
    q_btjnh, kc_btinh, vc_btinh = (x.reshape(b, t, k, n, h) for x in (q_xnh, kc_xnh, vc_xnh))
    memory_bs = jnp.broadcast_to(jnp.arange(s), (b, s))
    _, km_bsnh, vm_bsnh = attn.project(block.attn_norm(m_btd), memory_bs)
    f32, low = jnp.float32, jnp.finfo(jnp.float32).min
    mem_bntjs = jnp.einsum("btjnh,bsnh->bntjs", q_btjnh, km_bsnh, preferred_element_type=f32)
    own_bntji = jnp.einsum("btjnh,btinh->bntji", q_btjnh, kc_btinh, preferred_element_type=f32)
    upto_ts = jnp.arange(s)[None, :] <= p + jnp.arange(t)[:, None]
    read_b1t1s = (upto_ts[None] & seen_bs[:, None, :])[:, None, :, None, :]
    causal_ji = jnp.arange(k)[None, :] <= jnp.arange(k)[:, None]
    mem_bntjs, own_bntji = joint_softmax(
        jnp.where(read_b1t1s, mem_bntjs * h**-0.5, low),
        jnp.where(causal_ji, own_bntji * h**-0.5, low),
    )
    out_btjnh = jnp.einsum("bntjs,bsnh->btjnh", mem_bntjs, vm_bsnh) + jnp.einsum(
        "bntji,btinh->btjnh", own_bntji, vc_btinh
    )
    x_btkd = x_btkd + attn.o(out_btjnh.reshape(b, t, k, n * h))
    return x_btkd + block.mlp(block.mlp_norm(x_btkd))
