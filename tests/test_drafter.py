"""Drafters: incremental drafting equals the teacher-forced forward, for every kind; the
registry of kinds and the config's names agree."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.config.model import DRAFTER_KINDS
from mtp.decode.sampling import Sampling, choose
from mtp.model import drafter as drafters
from mtp.model.system import MTPSystem

MAIN = ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, taps=(0, 1))


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("kind", DRAFTER_KINDS)
def test_draft_equals_teacher_forcing_on_the_chosen_chain(kind, sampled):
    """`draft` (start, then one step per token) gives the logits the teacher-forced `__call__`
    gives when fed y0 and the drafted tokens, and each drafted token is the choice from them."""
    k, b = 4, 6
    drafter = MTPSystem(
        MAIN, DrafterConfig(kind=kind, k=k, n_layers=2), pad_id=0, rngs=nnx.Rngs(0)
    ).drafter
    taps_bld = jax.random.normal(jax.random.key(1), (b, len(MAIN.taps), MAIN.d_model))
    y0_b = jnp.arange(b, dtype=jnp.int32)
    s = Sampling(temperature=1.0 if sampled else 0.0)
    keys = jax.random.split(jax.random.key(2), k)
    pick = lambda logits_bv, j: choose(logits_bv, s, keys[j])
    tokens_bk, logits_bkv = jax.jit(lambda t, y: drafter.draft(t, y, pick))(taps_bld, y0_b)
    inputs_bk = jnp.concatenate([y0_b[:, None], tokens_bk[:, :-1]], axis=1)
    want_bkv = drafter(taps_bld[:, None], inputs_bk[:, None])[:, 0]
    np.testing.assert_allclose(logits_bkv, want_bkv, atol=1e-5)
    for j in range(k):
        np.testing.assert_array_equal(tokens_bk[:, j], pick(want_bkv[:, j], j))
    if kind != "medusa":  # the chain is not constant, so feeding the tokens is exercised
        assert len(np.unique(np.asarray(tokens_bk))) > 1


def test_config_kinds_and_registered_drafters_agree(monkeypatch):
    """A name outside DRAFTER_KINDS can't register; a kind left unregistered fails the check
    drafter.py runs at import."""
    assert set(drafters.DRAFTERS) == set(DRAFTER_KINDS)
    with pytest.raises(ValueError, match="DRAFTER_KINDS"):
        drafters.register("lstm")
    monkeypatch.delitem(drafters.DRAFTERS, "rnn")
    with pytest.raises(ImportError, match="rnn"):
        drafters._check_registry()


def test_a_kind_without_its_incremental_step_cannot_register(monkeypatch):
    """Every kind defines its forward, `start` and `step`; one without `step` is refused."""
    monkeypatch.delitem(drafters.DRAFTERS, "rnn")

    class NoStep(drafters.DrafterBase):
        def __call__(self, taps_btld, inputs_btk):
            return inputs_btk

        def start(self, taps_bld):
            return taps_bld

    with pytest.raises(TypeError, match="lacks step"):
        drafters.register("rnn")(NoStep)
    assert "rnn" not in drafters.DRAFTERS
