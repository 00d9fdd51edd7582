"""Incremental drafting gives the drafts of `drafter.draft`, for every drafter kind."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.decode import drafting
from mtp.decode.sampling import Sampling, choose
from mtp.model.system import MTPSystem

MAIN = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, taps=(0, 1))


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("kind", ["transformer", "medusa", "rnn"])
def test_incremental_drafts_equal_drafter_draft(kind, sampled):
    k, b = 4, 6
    system = MTPSystem(MAIN, DrafterConfig(kind=kind, k=k), pad_id=0, rngs=nnx.Rngs(0))
    assert type(system.drafter) in drafting.INCREMENTAL
    taps_bld = jax.random.normal(jax.random.key(1), (b, len(MAIN.taps), MAIN.d_model))
    y0_b = jnp.arange(b, dtype=jnp.int32)
    s = Sampling(temperature=1.0 if sampled else 0.0)
    keys = jax.random.split(jax.random.key(2), k)
    pick = lambda logits_bv, j: choose(logits_bv, s, keys[j])
    want_bk, want_bkv = system.drafter.draft(taps_bld, y0_b, pick)
    got_bk, got_bkv = jax.jit(lambda t, y: drafting.draft(system.drafter, t, y, pick))(
        taps_bld, y0_b
    )
    np.testing.assert_array_equal(got_bk, want_bk)
    np.testing.assert_allclose(got_bkv, want_bkv, atol=1e-5)
