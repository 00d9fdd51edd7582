"""Drafters: read the main model's taps at position t and draft y_1..y_k.

Every kind maps `(taps_btld, inputs_btk) -> logits_btkv`, where
`inputs_btk[..., j]` is the token emitted at draft step j (y_0 is the main
token) and `logits_btkv[..., j, :]` scores y_{j+1}. Logits at step j see only
`inputs[..., :j+1]` (causal over draft steps) and the tap at t (causal over
positions), so teacher forcing over a whole sequence needs no Python loop over
positions. Kinds, chosen by name from `DRAFTERS`:

- `transformer` (EAGLE-style, default): small causal transformer over the k
  draft steps; step j's input is the fused tap, the embedding of y_j and a
  learned embedding of j. (RoPE alone cannot tell steps apart when tokens
  repeat: equal inputs give equal values, so "=1" and "=11" would draft alike.)
- `medusa`: k independent residual-MLP heads on the tap (Cai et al. 2024).
- `rnn`: a GRU over draft steps started from the tap (ReDrafter-style,
  Cheng et al. 2024).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.model.transformer import Block


class TapFusion(nnx.Module):
    """Norms each tapped layer and projects their concatenation to the drafter width."""

    def __init__(self, main: ModelConfig, d: int, *, rngs: nnx.Rngs):
        self.norm = nnx.RMSNorm(main.d_model, epsilon=main.norm_eps, rngs=rngs)
        self.proj = nnx.Linear(len(main.taps) * main.d_model, d, use_bias=False, rngs=rngs)

    def __call__(self, taps_btld):
        b, t = taps_btld.shape[:2]
        return self.proj(self.norm(taps_btld.astype(jnp.float32)).reshape(b, t, -1))  # (B, T, d)


class DrafterBase(nnx.Module):
    """Shared parts: tap fusion, output head, and autoregressive drafting."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        self.k = cfg.k
        self.d = cfg.d_model or main.d_model
        self.fuse = TapFusion(main, self.d, rngs=rngs)
        self.out_norm = nnx.RMSNorm(self.d, epsilon=main.norm_eps, rngs=rngs)
        self.head = nnx.Linear(self.d, main.vocab_size, use_bias=False, rngs=rngs)

    def draft(
        self, taps_bld, y0_b, choose: Callable[[jax.Array, int], jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        """Drafts k tokens after y0 for one position per row.

        `choose(logits_bv, j)` picks y_{j+1} (greedy or sampled). Unrolled over
        the k steps (k is small); returns tokens (B, k) and logits (B, k, V).
        """
        b = y0_b.shape[0]
        inputs_bk = jnp.zeros((b, self.k), jnp.int32).at[:, 0].set(y0_b)
        tokens, logits = [], []
        for j in range(self.k):
            logits_bv = self(taps_bld[:, None], inputs_bk[:, None])[:, 0, j]
            y_b = choose(logits_bv, j)
            tokens.append(y_b)
            logits.append(logits_bv)
            if j + 1 < self.k:
                inputs_bk = inputs_bk.at[:, j + 1].set(y_b)
        return jnp.stack(tokens, 1), jnp.stack(logits, 1)


class TransformerDrafter(DrafterBase):
    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        self.embed = nnx.Embed(main.vocab_size, self.d, rngs=rngs)
        self.in_proj = nnx.Linear(2 * self.d, self.d, use_bias=False, rngs=rngs)
        self.step_embed = nnx.Embed(cfg.k, self.d, rngs=rngs)
        block_cfg = dataclasses.replace(
            main, d_model=self.d, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads, d_ff=0,
            dtype="float32", taps=(-1,), n_registers=0, use_urgency=False,
        )  # fmt: skip
        self.blocks = nnx.List([Block(block_cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def step_inputs(self, h_xd, tokens_x, steps_x):
        """Block input of draft steps: fused tap h (..., d), token y_j (...), step j (...)."""
        x_xd = self.in_proj(jnp.concatenate([h_xd, self.embed(tokens_x)], axis=-1))
        return x_xd + self.step_embed(steps_x)

    def __call__(self, taps_btld, inputs_btk):
        b, t, k = inputs_btk.shape
        h_btkd = jnp.broadcast_to(self.fuse(taps_btld)[:, :, None], (b, t, k, self.d))
        x_btkd = self.step_inputs(h_btkd, inputs_btk, jnp.broadcast_to(jnp.arange(k), (b, t, k)))
        x_nkd = x_btkd.reshape(b * t, k, self.d)  # each position's draft chain on its own
        step_nk = jnp.broadcast_to(jnp.arange(k), (b * t, k))
        for block in self.blocks:
            x_nkd, _ = block(x_nkd, step_nk)
        return self.head(self.out_norm(x_nkd)).reshape(b, t, k, -1)  # (B, T, k, V)


class MedusaDrafter(DrafterBase):
    """k residual-MLP heads; ignores the drafted tokens (each offset guessed from h_t alone)."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        init = nnx.initializers.lecun_normal()
        self.w_kdd = nnx.Param(init(rngs.params(), (cfg.k, self.d, self.d)) * 0.1)

    def __call__(self, taps_btld, inputs_btk):
        h_btd = self.fuse(taps_btld)
        x_btkd = h_btd[:, :, None] + jax.nn.silu(
            jnp.einsum("btd,kde->btke", h_btd, self.w_kdd[...])
        )
        return self.head(self.out_norm(x_btkd))  # (B, T, k, V)


class RNNDrafter(DrafterBase):
    """GRU over draft steps: state from h_t, input at step j the embedding of y_j."""

    def __init__(self, cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, main, rngs=rngs)
        self.embed = nnx.Embed(main.vocab_size, self.d, rngs=rngs)
        self.cell = nnx.GRUCell(self.d, self.d, rngs=rngs)

    def __call__(self, taps_btld, inputs_btk):
        b, t, k = inputs_btk.shape
        s_nd = jnp.tanh(self.fuse(taps_btld)).reshape(b * t, self.d)
        e_nkd = self.embed(inputs_btk).reshape(b * t, k, self.d)
        outs = []
        for j in range(k):
            s_nd, y_nd = self.cell(s_nd, e_nkd[:, j])
            outs.append(y_nd)
        x_btkd = jnp.stack(outs, 1).reshape(b, t, k, self.d)
        return self.head(self.out_norm(x_btkd))  # (B, T, k, V)


DRAFTERS: dict[str, type[DrafterBase]] = {
    "transformer": TransformerDrafter,
    "medusa": MedusaDrafter,
    "rnn": RNNDrafter,
}


def make_drafter(cfg: DrafterConfig, main: ModelConfig, *, rngs: nnx.Rngs) -> DrafterBase:
    return DRAFTERS[cfg.kind](cfg, main, rngs=rngs)
