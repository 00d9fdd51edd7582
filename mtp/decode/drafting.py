"""Incremental drafting for the decode loop: the drafts of `drafter.draft`, cheaper.

`DrafterBase.draft` runs the drafter over the whole chain of k steps once per
draft step (k^2 step evaluations, the output head on every one). In a decode
pass that costs about as much as the main model's verify forward on a CPU, so
here each kind advances one step at a time from cached state:

- `transformer`: one new position per step through the blocks, with a
  k-slot KV cache per block (the blocks are the main model's `Block`);
- `rnn`: one GRU step per draft step;
- `medusa`: all k heads in one call (the heads ignore the drafted tokens).

The steps run in a `fori_loop`, so the decode loop compiles one drafter step,
not k.

Other drafter classes fall back to `drafter.draft`. The logits equal the
drafter's teacher-forced `__call__` up to float rounding;
`tests/test_decode_drafting.py` checks each kind against `drafter.draft`.
(Better home: `DrafterBase.draft` itself; kept here while the model files
belong to another issue.)
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtp.model.drafter import DrafterBase, MedusaDrafter, RNNDrafter, TransformerDrafter

Choose = Callable[[jax.Array, int], jax.Array]
UNROLL = False


def _run(k: int, state, y0_b, step, choose: Choose, v: int):
    """Runs `step(state, y_b, j) -> (state, logits_bv)` for j < k in a fori_loop, feeding
    each chosen token to the next step: one compiled step, however large k is."""
    b = y0_b.shape[0]

    def body(j, carry):
        state, y_b, tokens_bk, logits_bkv = carry
        state, logits_bv = step(state, y_b, j)
        y_b = choose(logits_bv, j)
        return state, y_b, tokens_bk.at[:, j].set(y_b), logits_bkv.at[:, j].set(logits_bv)

    init = (state, y0_b, jnp.zeros((b, k), jnp.int32), jnp.zeros((b, k, v), jnp.float32))
    _, _, tokens_bk, logits_bkv = jax.lax.fori_loop(0, k, body, init, unroll=UNROLL)
    return tokens_bk, logits_bkv


def _transformer(drafter: TransformerDrafter, taps_bld, y0_b, choose: Choose):
    b, k = y0_b.shape[0], drafter.k
    acfg = drafter.blocks[0].attn.cfg
    shape = (b, k, acfg.n_kv_heads, acfg.head_dim)
    caches = tuple({"k": jnp.zeros(shape), "v": jnp.zeros(shape)} for _ in drafter.blocks)
    h_b1d = drafter.fuse(taps_bld[:, None])  # (B, 1, d)

    def step(caches, y_b, j):
        slot_b1 = jnp.full((b, 1), j, jnp.int32)
        x_b1d = drafter.step_inputs(h_b1d, y_b[:, None], slot_b1)
        new = []
        for block, cache in zip(drafter.blocks, caches, strict=True):
            x_b1d, cache = block(x_b1d, slot_b1, cache)
            new.append(cache)
        return tuple(new), drafter.head(drafter.out_norm(x_b1d))[:, 0]

    return _run(k, caches, y0_b, step, choose, drafter.head.out_features)


def _rnn(drafter: RNNDrafter, taps_bld, y0_b, choose: Choose):
    s_bd = jnp.tanh(drafter.fuse(taps_bld[:, None]))[:, 0]

    def step(s_bd, y_b, j):
        s_bd, o_bd = drafter.cell(s_bd, drafter.embed(y_b))
        return s_bd, drafter.head(drafter.out_norm(o_bd))

    return _run(drafter.k, s_bd, y0_b, step, choose, drafter.head.out_features)


def _medusa(drafter: MedusaDrafter, taps_bld, y0_b, choose: Choose):
    b, k = y0_b.shape[0], drafter.k
    logits_bkv = drafter(taps_bld[:, None], jnp.zeros((b, 1, k), jnp.int32))[:, 0]
    tokens = [choose(logits_bkv[:, j], j) for j in range(k)]
    return jnp.stack(tokens, 1), logits_bkv


INCREMENTAL: dict[type, Callable] = {
    TransformerDrafter: _transformer,
    RNNDrafter: _rnn,
    MedusaDrafter: _medusa,
}


def draft(drafter: DrafterBase, taps_bld, y0_b, choose: Choose) -> tuple[jax.Array, jax.Array]:
    """Same contract as `drafter.draft`: tokens (B, k) and logits (B, k, V) after y0 (B,)."""
    fn = INCREMENTAL.get(type(drafter))
    if fn is None:
        return drafter.draft(taps_bld, y0_b, choose)
    return fn(drafter, taps_bld, y0_b, choose)
