"""Main model + drafter: causality of draft logits, losses fall, detach stops gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.model.system import MTPSystem
from mtp.train.losses import draft_accuracy, offset_weights, supervised_loss

MAIN = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
KINDS = ["transformer", "medusa", "rnn"]


def _system(kind, k=3, detach=False, taps=(-1,), seed=0):
    import dataclasses

    main = dataclasses.replace(MAIN, taps=taps)
    return MTPSystem(
        main, DrafterConfig(kind=kind, k=k, detach=detach), pad_id=0, rngs=nnx.Rngs(seed)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_no_future_token_reaches_draft_logits(kind):
    """Draft logits at (t, j) score x_{t+2+j}; they may read x_{<=t+1+j} only."""
    k, t_len = 3, 12
    system = _system(kind, k=k, taps=(0, 1))
    tokens = jax.random.randint(jax.random.key(0), (1, t_len), 1, MAIN.vocab_size)

    def draft(tokens):
        return system(tokens)[1][0]  # (T, k, V)

    jac = jax.jacobian(lambda e: draft_from_embeddings(system, e))(system.main.embed(tokens))
    # jac: (T, k, V, 1, T, D) -> influence of input position s on logits (t, j)
    infl_tks = jnp.abs(jac).sum(axis=(2, 3, 5))
    for t in range(t_len):
        for j in range(k):
            visible = t + 1 + j
            assert float(infl_tks[t, j, visible + 1 :].max(initial=0.0)) == 0.0, (t, j)
    # and drafter token inputs: changing the target token itself changes nothing
    base = draft(tokens)
    for t in range(t_len - 3):
        changed = tokens.at[0, t + 2].set((tokens[0, t + 2] + 1) % MAIN.vocab_size)
        np.testing.assert_allclose(draft(changed)[t, 0], base[t, 0], atol=1e-6)


def draft_from_embeddings(system, x_btd):
    """Draft logits with the main model fed embeddings (for a Jacobian w.r.t. positions)."""
    b, t, _ = x_btd.shape
    slot = jnp.broadcast_to(jnp.arange(t), (b, t))
    _, taps, _ = system.main._blocks(x_btd, slot, None)
    # the drafter's token inputs are fixed here; taps carry the positional influence
    inputs = jnp.zeros((b, t, system.k), jnp.int32)
    return system.drafter(taps, inputs)[0]


@pytest.mark.parametrize("kind", ["transformer", "rnn"])
def test_drafter_tells_repeated_draft_tokens_apart(kind):
    """After "=1" the next digit may be "1" again, after "=11" a space: with the same tap and
    the same token at steps 0 and 1, the steps' logits must still differ (the transformer
    drafter's step embedding; without it, RoPE over equal inputs gives equal outputs)."""
    system = _system(kind, k=3)
    taps_btld = jax.random.normal(jax.random.key(1), (1, 1, 1, MAIN.d_model))
    inputs_btk = jnp.full((1, 1, 3), 7, jnp.int32)
    logits_kv = system.drafter(taps_btld, inputs_btk)[0, 0]
    assert float(jnp.abs(logits_kv[1] - logits_kv[0]).max()) > 1e-3
    assert float(jnp.abs(logits_kv[2] - logits_kv[1]).max()) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_each_drafter_kinds_loss_falls_on_a_tiny_batch(kind):
    system = _system(kind, k=2)
    tokens = jnp.tile(jnp.arange(1, 9), (2, 3))[:, :20]  # a periodic sequence
    mask = jnp.ones_like(tokens, jnp.float32)
    opt = nnx.Optimizer(system, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(system, opt):
        def loss_fn(system):
            lo, dr = system(tokens)
            w = offset_weights(2, 0.8)
            return supervised_loss(lo, dr, tokens, mask, draft_weights_k=w)[1]["loss/draft"]

        loss, grads = nnx.value_and_grad(loss_fn)(system)
        opt.update(system, grads)
        return loss

    losses = [float(step(system, opt)) for _ in range(40)]
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    lo, dr = system(tokens)
    acc = draft_accuracy(lo, dr, tokens, mask)
    assert float(acc["acc/draft"][0]) > 0.9


@pytest.mark.parametrize("detach", [False, True])
def test_detach_stops_drafter_gradient_into_main(detach):
    system = _system("transformer", detach=detach)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 1, MAIN.vocab_size)

    def draft_only(system):
        _, dr = system(tokens)
        return dr.sum()

    grads = nnx.grad(draft_only)(system)
    g_main = optax.global_norm(jax.tree.leaves(nnx.state(grads)["main"]))
    assert (float(g_main) == 0.0) == detach


def test_pass_logprobs_match_a_direct_gather():
    system = _system("rnn", k=2)
    tokens = jax.random.randint(jax.random.key(3), (2, 9), 1, MAIN.vocab_size)
    main_bt, draft_btk = system.pass_logprobs(tokens)
    lo, dr = system(tokens)
    assert np.isclose(main_bt[1, 4], jax.nn.log_softmax(lo[1, 4])[tokens[1, 5]], atol=1e-5)
    assert np.isclose(
        draft_btk[0, 3, 1], jax.nn.log_softmax(dr[0, 3, 1])[tokens[0, 3 + 3]], atol=1e-5
    )


def test_accepted_length_counts_joint_prefixes():
    """Two drafts each right half the time, never together: accepted length 0.5, not 0.75."""
    v, t = 5, 6
    tokens = jnp.zeros((1, t), jnp.int32)
    logits = jax.nn.one_hot(jnp.zeros((1, t), jnp.int32), v) * 10  # main always says 0
    good, bad = jax.nn.one_hot(0, v) * 10, jax.nn.one_hot(1, v) * 10
    rows = [jnp.stack([good, bad]) if i % 2 else jnp.stack([bad, good]) for i in range(t)]
    draft = jnp.stack(rows)[None]  # (1, T, 2, V)
    m = draft_accuracy(logits, draft, tokens, jnp.ones((1, t)))
    full = [i for i in range(t) if i + 3 < t]
    expected = np.mean([1.0 if i % 2 else 0.0 for i in full])
    assert np.isclose(float(m["accepted_len"]), expected)
