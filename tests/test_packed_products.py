"""Weight products on packed weights: the kernel multiplies as XLA does, a row's result does
not depend on the rows beside it, and the decoding loop runs its products on weights the
Decoder packed once per weights (not in each call), with the same outputs as XLA's."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode_hlo import _in_loops

from mtp.config import DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.errors import DecodeError
from mtp.model import packed_products as pp
from mtp.model.system import MTPSystem

pytestmark = pytest.mark.skipif(
    not pp.available(), reason="the packed kernel needs one x86-64 CPU with AVX-512 and g++"
)
TOK = ByteTokenizer()


@pytest.fixture(autouse=True)
def pack_every_size(monkeypatch):
    """The test models' weights are far below `MIN_BYTES`: pack them all the same."""
    monkeypatch.setattr(pp, "MIN_BYTES", 0)


@jax.jit
def _packed(x_mk, w_kn):
    return pp.product(x_mk, pp.pack(w_kn), w_kn.shape[1])


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 32])
@pytest.mark.parametrize("k, n", [(576, 576), (100, 200), (37, 64)])
def test_the_kernel_multiplies_as_xla_does(m, k, n):
    rng = np.random.default_rng(m * k + n)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(_packed(x, w))
    want = x.astype(np.float64) @ w
    assert got.shape == (m, n)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())


def test_a_tied_heads_rows_pack_as_its_transpose():
    rng = np.random.default_rng(0)
    e_vd = rng.standard_normal((100, 48)).astype(np.float32)  # V not a multiple of 64
    x = rng.standard_normal((3, 48)).astype(np.float32)
    got = pp.product(jnp.asarray(x), pp.pack_rows(jnp.asarray(e_vd)), 100)
    np.testing.assert_allclose(got, x @ e_vd.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [5, 13])
def test_a_rows_result_is_bit_identical_whatever_the_rows_beside_it(m):
    """What makes a row's logits the same in a one-token and a (k + 1)-token pass."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((m, 1536)).astype(np.float32)
    w = rng.standard_normal((1536, 640)).astype(np.float32)
    together = np.asarray(_packed(x, w))
    for r in range(m):
        np.testing.assert_array_equal(np.asarray(_packed(x[r : r + 1], w))[0], together[r])


def test_dense_on_packed_weights_equals_linear_with_its_bias():
    layer = pp.Dense(40, 70, use_bias=True, rngs=nnx.Rngs(0))
    layer.bias[...] = jnp.arange(70, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (2, 3, 40))
    want = layer(x)
    pp.pack_all(layer)
    assert layer.packed is not None
    np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer(x[:, :1]), want[:, :1], rtol=1e-5, atol=1e-5)


def _system(tie=True):
    main = ModelConfig(vocab_size=262, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_len=64, tie_embeddings=tie)  # fmt: skip
    drafter = DrafterConfig(kind="transformer", k=3, n_heads=4)
    return MTPSystem(main, drafter, pad_id=TOK.specials.pad, rngs=nnx.Rngs(0))


def _loop_hlo(dec, mode):
    call = dec.prepare([np.arange(1, 6)], mode=mode, max_new_tokens=8, stop_id=-1)
    prefill, loop = dec.jits(call.slots)
    after = prefill(dec.state, *call.prefill_args, keep_taps=False)
    return loop.lower(dec.state, *after, *call.loop_args, plan=call.plan).compile().as_text()


@pytest.mark.parametrize("mode", ["slow", "speculative"])
def test_the_loop_multiplies_weights_packed_once_per_weights_not_per_call(mode):
    system = _system()
    dec = Decoder(system, TOK.specials, packed=True)
    hlo = _loop_hlo(dec, mode)
    calls = re.findall(rf'custom_call_target="{pp.TARGET}"', _in_loops(hlo))
    n_products = 2 * 5 + 1  # per pass: 2 layers of q, kv, o, gate_up, down, and the tied head
    assert len(calls) >= n_products, len(calls)
    # the packed copies (T, K, 64) of weights reading d_model = 32 inputs come in with the state
    packed = [x for x in jax.tree.leaves(dec.state) if x.ndim == 3 and x.shape[1:] == (32, 64)]
    assert len(packed) >= 2 * 3 + 1, "q, kv, gate_up of each layer and the head, packed"
    packs = r"= f32\[\d+,32,64\]\S* (?:transpose|copy|fusion)\("
    assert not re.findall(packs, hlo), "the call packs weights: once per call, not per weights"
    xla = _loop_hlo(Decoder(system, TOK.specials, packed=False), mode)
    assert pp.TARGET not in xla


def test_new_weights_are_packed_anew():
    """`set_weights` (an RL update): packed decoding follows the new weights, not stale copies."""
    dec_packed = Decoder(_system(), TOK.specials, packed=True)
    new = _system()
    new.main.embed.embedding[...] = jax.random.normal(jax.random.key(7), (262, 32))
    dec_packed.set_weights(new)
    prompts, kw = [np.arange(1, 9)], dict(mode="slow", max_new_tokens=16, stop_id=-1)
    want = Decoder(new, TOK.specials, packed=False).generate(prompts, **kw).tokens
    old = Decoder(_system(), TOK.specials, packed=False).generate(prompts, **kw).tokens
    assert not np.array_equal(want, old), "new weights, new tokens (else this tests nothing)"
    np.testing.assert_array_equal(dec_packed.generate(prompts, **kw).tokens, want)


@pytest.mark.parametrize("mode", ["slow", "speculative", "fast"])
@pytest.mark.parametrize("tie", [True, False])
def test_packed_decoding_gives_xlas_tokens(mode, tie):
    system = _system(tie)
    prompts = [np.arange(1, 9), np.arange(20, 25)]
    kw = dict(mode=mode, max_new_tokens=24, stop_id=-1)
    packed = Decoder(system, TOK.specials, packed=True).generate(prompts, **kw)
    xla = Decoder(system, TOK.specials, packed=False).generate(prompts, **kw)
    np.testing.assert_array_equal(packed.tokens, xla.tokens)
    if mode == "speculative":  # and lossless against its own slow decoding
        kw["mode"] = "slow"
        slow = Decoder(system, TOK.specials, packed=True).generate(prompts, **kw)
        np.testing.assert_array_equal(packed.tokens, slow.tokens)


def test_switched_off_it_is_unavailable_and_a_decoder_asking_for_it_fails(monkeypatch):
    monkeypatch.setenv("MTP_PACKED_PRODUCTS", "0")
    pp.available.cache_clear()
    try:
        assert not pp.available()
        assert Decoder(_system(), TOK.specials).packed is False
        with pytest.raises(DecodeError, match="packed=True"):
            Decoder(_system(), TOK.specials, packed=True)
    finally:
        monkeypatch.delenv("MTP_PACKED_PRODUCTS")
        pp.available.cache_clear()
    assert pp.available()
