"""Main model + drafter: causality of draft logits, losses fall, detach stops gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.model.system import MTPSystem, shifted
from mtp.train.losses import draft_accuracy, offset_weights, supervised_loss

MAIN = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
KINDS = ["transformer", "medusa", "rnn"]


def _system(kind, k=3, detach=False, taps=(-1,), seed=0):
    main = dataclasses.replace(MAIN, taps=taps)
    return MTPSystem(
        main, DrafterConfig(kind=kind, k=k, detach=detach), pad_id=0, rngs=nnx.Rngs(seed)
    )


@pytest.mark.parametrize("kind", KINDS)
def test_no_future_token_reaches_draft_logits(kind, monkeypatch):
    """Position t sees tokens x_<=t only. Changing any x_s, s > t, leaves the main logits at t,
    the taps the drafter reads at t and, with the drafter fed the same chain x_{t+1..t+k}, the
    draft logits at t unchanged. With the chain fed as in training, draft logits at (t, j),
    which score x_{t+2+j}, don't move either while s > t + 1 + j: no target reaches its logit."""
    k, t_len = 3, 10
    system = _system(kind, k=k, taps=(0, 1))
    tokens_bt = jax.random.randint(jax.random.key(0), (1, t_len), 1, MAIN.vocab_size)
    drafter_cls = type(system.drafter)
    teacher_forced = drafter_cls.__call__

    def run(tokens_bt, chain_btk=None):
        """Main logits (T, V), taps the drafter read (T, L, D), draft logits (T, k, V); the
        drafter fed chain_btk in place of the system's own inputs when given."""
        seen = {}

        def spy(drafter, taps_btld, inputs_btk):
            seen["taps"] = taps_btld
            return teacher_forced(
                drafter, taps_btld, inputs_btk if chain_btk is None else chain_btk
            )

        with monkeypatch.context() as m:
            m.setattr(drafter_cls, "__call__", spy)
            logits_btv, draft_btkv = system(tokens_bt)
        return logits_btv[0], seen["taps"][0], draft_btkv[0]

    close = lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6)
    base_tv, base_tld, base_tkv = run(tokens_bt)
    chain_btk = shifted(tokens_bt, k, 0)
    for s in range(1, t_len):
        changed_bt = tokens_bt.at[0, s].set((tokens_bt[0, s] + 1) % MAIN.vocab_size)
        logits_tv, taps_tld, draft_tkv = run(changed_bt, chain_btk)
        close(logits_tv[:s], base_tv[:s])
        close(taps_tld[:s], base_tld[:s])
        close(draft_tkv[:s], base_tkv[:s])
        # the change is seen from s on, so the checks above are not vacuous
        assert not np.allclose(taps_tld[s], base_tld[s], atol=1e-3)
        assert not np.allclose(draft_tkv[s], base_tkv[s], atol=1e-3)
        _, _, draft_tkv = run(changed_bt)
        for t in range(s):
            for j in range(min(k, s - t - 1)):  # t + 1 + j < s
                close(draft_tkv[t, j], base_tkv[t, j])


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

    grads = nnx.jit(nnx.grad(draft_only))(system)
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
