"""Main model: cached decoding equals the full forward; registers and GQA hold shapes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import ModelConfig
from mtp.model.transformer import Transformer

CFG = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=40)


@functools.partial(nnx.jit, static_argnames="fresh")
def _call(model, tokens_bt, positions_bt=None, cache=None, fresh=False):
    """The model's pass, jitted as the decoder runs it (one program per shape, where eager
    ops would compile one by one)."""
    return model(tokens_bt, positions_bt, cache, fresh=fresh)


def _chunks(model, tokens_bt, sizes):
    """Feeds tokens in chunks of the given sizes through the KV cache."""
    b = tokens_bt.shape[0]
    cache, outs, taps, pos = model.init_cache(b), [], [], 0
    for n in sizes:
        positions = jnp.broadcast_to(jnp.arange(pos, pos + n), (b, n))
        lo, ta, cache = _call(model, tokens_bt[:, pos : pos + n], positions, cache)
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
    full, taps, _ = _call(model, tokens)
    # a prefill, then steps of 1 to k+1 tokens
    for sizes in ([20], [8, 1, 1, 5, 3, 2], [1] * 20):
        lo, ta = _chunks(model, tokens, sizes)
        np.testing.assert_allclose(lo, full, atol=1e-4)
        np.testing.assert_allclose(ta, taps, atol=1e-4)


@pytest.mark.parametrize("n_registers", [0, 3])
def test_a_fresh_prefill_reads_only_the_registers_and_decodes_on_the_same(n_registers):
    """`fresh` (a prefill from position 0) skips reading the empty cache: its logits, taps
    and cache equal the plain cached prefill's, with registers attended to, and the next
    passes continue from its cache as from the plain one's."""
    cfg = dataclasses.replace(CFG, n_registers=n_registers, taps=(0, 1))
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, cfg.vocab_size)
    full, _, _ = _call(model, tokens)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    plain = _call(model, tokens[:, :12], pos, model.init_cache(2))
    fresh = _call(model, tokens[:, :12], pos, model.init_cache(2), fresh=True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(fresh), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(fresh[0], full[:, :12], atol=1e-4)
    nxt = jnp.broadcast_to(jnp.arange(12, 16), (2, 4))
    lo, _, _ = _call(model, tokens[:, 12:], nxt, fresh[2])
    np.testing.assert_allclose(lo, full[:, 12:], atol=1e-4)


@pytest.mark.parametrize("n_registers", [0, 2])
def test_rows_at_different_positions_and_stale_slots_are_ignored(n_registers):
    """Speculative decoding's cache use: rows at their own positions feed k + 1 tokens per
    pass, keep a different number of them each (the rest are rejected drafts), rewind by the
    rest and write over those slots on the next pass. Every kept output equals a full forward
    of the row's kept tokens."""
    cfg = dataclasses.replace(CFG, n_registers=n_registers)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    key_t, key_j = jax.random.split(jax.random.key(2))
    true_bt = jax.random.randint(key_t, (3, cfg.max_len), 0, cfg.vocab_size)
    # junk_bt differs from true_bt everywhere: a rejected draft, or prompt padding
    shift_bt = jax.random.randint(key_j, true_bt.shape, 1, cfg.vocab_size)
    junk_bt = (true_bt + shift_bt) % cfg.vocab_size
    full_btv, full_taps, _ = _call(model, true_bt)
    plen_b = np.array([3, 9, 6])
    kept_pb = np.array([[0, 3, 1], [3, 0, 2], [1, 2, 0], [2, 1, 3], [0, 0, 1]])  # tokens kept - 1
    w, cols = 4, np.arange(cfg.max_len)

    def fed(pos_b, n_b, width):
        """Each row's true tokens from pos_b on, junk after the first n_b."""
        keep_bt = (cols >= pos_b[:, None]) & (cols < (pos_b + n_b)[:, None])
        tokens_bt = jnp.where(keep_bt, true_bt, junk_bt)
        idx_bt = pos_b[:, None] + np.arange(width)
        return jnp.take_along_axis(tokens_bt, jnp.asarray(idx_bt), 1), jnp.asarray(idx_bt)

    def check(lo_bwv, ta_bwld, pos_b, n_b):
        for b in range(3):
            p, n = pos_b[b], n_b[b]
            np.testing.assert_allclose(lo_bwv[b, :n], full_btv[b, p : p + n], atol=1e-4)
            np.testing.assert_allclose(ta_bwld[b, :n], full_taps[b, p : p + n], atol=1e-4)

    # the prefill: right-padded prompts, junk past each prompt's end
    zeros_b = np.zeros(3, int)
    feed_bw, pos_bw = fed(zeros_b, plen_b, 10)
    lo, ta, cache = _call(model, feed_bw, pos_bw, model.init_cache(3))
    check(lo, ta, zeros_b, plen_b)
    pos_b = plen_b
    for kept_b in kept_pb:  # pass: y0 and 3 drafts fed, y0 and kept_b drafts kept
        feed_bw, pos_bw = fed(pos_b, kept_b + 1, w)
        lo, ta, cache = _call(model, feed_bw, pos_bw, cache)
        check(lo, ta, pos_b, kept_b + 1)
        pos_b = pos_b + kept_b + 1
    assert len(set(pos_b.tolist())) == 3  # still ragged after the passes


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


def test_a_verification_pass_equals_one_token_passes_to_float32_rounding():
    """What "speculative greedy equals slow" rests on: the logits of a (k + 1)-token cached
    pass equal those of k + 1 one-token passes to float32 rounding, so greedy choices agree
    but for ties that close. With bfloat16 weights and compute they agree only to bfloat16
    rounding, so there speculative greedy can differ from slow where two logits are that
    close."""
    dims = dict(vocab_size=997, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_len=48)
    tokens = jax.random.randint(jax.random.key(2), (4, 24), 0, 997)
    gaps = {}
    for dtype in ("float32", "bfloat16"):
        cfg = ModelConfig(**dims, dtype=dtype, param_dtype=dtype)
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        wide, _ = _chunks(model, tokens, [19, 5])
        one, _ = _chunks(model, tokens, [19, 1, 1, 1, 1, 1])
        gaps[dtype] = float(jnp.abs(wide[:, 19:] - one[:, 19:]).max() / one.std())
    assert gaps["float32"] < 1e-5, gaps  # 4e-6 of the logits' std (jax 0.10.2, CPU)
    assert gaps["bfloat16"] < 0.1, gaps  # 0.023: bfloat16 rounding, not a different model
