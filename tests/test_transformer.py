"""Main model: cached decoding equals the full forward; registers and GQA hold shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import ModelConfig
from mtp.model.transformer import Transformer

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=40)


def _chunks(model, tokens_bt, sizes):
    """Feeds tokens in chunks of the given sizes through the KV cache."""
    b = tokens_bt.shape[0]
    cache, outs, taps, pos = model.init_cache(b), [], [], 0
    for n in sizes:
        positions = jnp.broadcast_to(jnp.arange(pos, pos + n), (b, n))
        lo, ta, cache = model(tokens_bt[:, pos : pos + n], positions, cache)
        outs.append(lo)
        taps.append(ta)
        pos += n
    return jnp.concatenate(outs, 1), jnp.concatenate(taps, 1)


@pytest.mark.parametrize("n_registers", [0, 3])
@pytest.mark.parametrize("tie", [True, False])
def test_cached_decoding_equals_full_forward(n_registers, tie):
    cfg = dataclasses.replace(CFG, n_registers=n_registers, tie_embeddings=tie, taps=(0, 1))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 20), 0, cfg.vocab_size)
    full, taps, _ = model(tokens)
    # a prefill, then steps of 1 to k+1 tokens
    for sizes in ([20], [8, 1, 1, 5, 3, 2], [1] * 20):
        lo, ta = _chunks(model, tokens, sizes)
        np.testing.assert_allclose(lo, full, atol=1e-4)
        np.testing.assert_allclose(ta, taps, atol=1e-4)


def test_rows_at_different_positions_and_stale_slots_are_ignored():
    """Row 1 rewinds (rejected drafts) and rewrites; it must match a clean forward."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(2), (2, 12), 0, CFG.vocab_size)
    full, _, _ = model(tokens)
    cache = model.init_cache(2)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    junk = jnp.full((2, 8), 7)
    _, _, cache = model(junk, pos, cache)  # garbage written at 0..7
    _, _, cache = model(tokens[:, :8], pos, cache)  # overwritten by the true prefix
    # row 0 writes junk at 8..10 that it later rewrites; both rows continue at 8
    pos3 = jnp.broadcast_to(jnp.arange(8, 11), (2, 3))
    _, _, cache = model(jnp.full((2, 3), 3), pos3, cache)
    lo, _, _ = model(tokens[:, 8:9], jnp.full((2, 1), 8), cache)
    np.testing.assert_allclose(lo[:, 0], full[:, 8], atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    logits, taps, _ = model(jnp.zeros((2, 5), jnp.int32))
    assert logits.dtype == jnp.float32 and taps.dtype == jnp.bfloat16
    ref, _, _ = Transformer(CFG, rngs=nnx.Rngs(0))(jnp.zeros((2, 5), jnp.int32))
    np.testing.assert_allclose(logits, ref, atol=0.1)


def test_taps_are_the_residual_stream_of_the_named_layers():
    cfg = dataclasses.replace(CFG, taps=(1, 0))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(10)[None] % cfg.vocab_size
    _, taps, _ = model(tokens)
    x = model.embed(tokens)
    slot = jnp.arange(10)[None]
    h0, _ = model.blocks[0](x, slot)
    h1, _ = model.blocks[1](h0, slot)
    np.testing.assert_allclose(taps[:, :, 0], h1, atol=1e-5)
    np.testing.assert_allclose(taps[:, :, 1], h0, atol=1e-5)


def test_urgency_changes_the_models_input():
    cfg = dataclasses.replace(CFG, use_urgency=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    model.urgency[...] = jnp.ones((cfg.d_model,))
    tokens = jnp.zeros((2, 4), jnp.int32)
    a, _, _ = model(tokens, urgency_b=jnp.array([0.0, 1.0]))
    assert not np.allclose(a[0], a[1])
