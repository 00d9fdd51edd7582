"""RL math on hand-built rollouts: per-token log-probs, gradient paths, GRPO/RLOO, PPO ratio."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, RLConfig
from mtp.model.system import MTPSystem
from mtp.train import rl

MAIN = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
K = 2
RC = RLConfig(temperature=1.0, ppo_epochs=2, clip_eps=0.2, lr=1e-2, warmup_steps=0)


def _system(detach=False, seed=0):
    return MTPSystem(MAIN, DrafterConfig(k=K, n_heads=2, detach=detach), pad_id=0,
                     rngs=nnx.Rngs(seed))  # fmt: skip


def _rollouts(b=4, l=20, prompt=5, seed=0):
    """A fast-mode rollout layout: `prompt` tokens, then passes of k + 1 tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, MAIN.vocab_size, (b, l)).astype(np.int32)
    gen = np.arange(l) - prompt
    offset = np.where(gen >= 0, gen % (K + 1), 0)
    pass_ = np.where(gen >= 0, gen // (K + 1), 0)
    mask = (gen >= 0).astype(np.float32)
    batch = dict(
        tokens=tokens,
        offset=np.broadcast_to(offset, (b, l)).astype(np.int32),
        pass_=np.broadcast_to(pass_, (b, l)).astype(np.int32),
        mask=np.broadcast_to(mask, (b, l)).copy(),
        adv=np.linspace(-1, 1, b).astype(np.float32),
        old_lp=np.zeros((b, l), np.float32),
        ref_lp=np.zeros((b, l), np.float32),
    )
    return {key: jnp.asarray(v) for key, v in batch.items()}


def _grad_norms(grads):
    state = nnx.to_pure_dict(grads)
    norm = lambda tree: float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)) ** 0.5)
    return norm(state.get("main", {})), norm(state.get("drafter", {}))


def test_token_logprobs_pick_main_or_drafter_by_offset():
    system, batch = _system(), _rollouts()
    lp, ent, _ = rl.token_stats(system, batch["tokens"], batch["offset"])
    main_bt, draft_btk = system.pass_logprobs(batch["tokens"])
    off = np.asarray(batch["offset"])
    for b in range(2):
        for l in range(5, 20):
            o = off[b, l]
            want = main_bt[b, l - 1] if o == 0 else draft_btk[b, l - 1 - o, o - 1]
            np.testing.assert_allclose(lp[b, l], want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ent)[:, 5:] > 0)


def test_policy_gradient_reaches_main_model_through_drafter():
    """Only drafted tokens carry advantage: the main model still gets a gradient via h_t."""
    batch = _rollouts()
    batch["mask"] = batch["mask"] * (batch["offset"] > 0)  # main tokens out of the loss
    _, grads = rl.rl_grads(_system(), batch, RC, "both")
    main, drafter = _grad_norms(grads)
    assert main > 1e-6 and drafter > 1e-6

    _, grads = rl.rl_grads(_system(detach=True), batch, RC, "both")
    main, drafter = _grad_norms(grads)
    assert main == 0.0 and drafter > 1e-6


def test_trainable_drafter_gives_no_main_gradient():
    _, grads = rl.rl_grads(_system(), _rollouts(), RC, "drafter")
    main, drafter = _grad_norms(grads)
    assert main == 0.0 and drafter > 1e-6


def test_equal_rewards_in_a_group_give_zero_grpo_gradient():
    rewards = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    adv = rl.ADVANTAGES["grpo"](rewards)
    np.testing.assert_array_equal(adv, 0.0)
    batch = _rollouts() | {"adv": jnp.asarray(adv[0])}
    for loss in ("ppo", "reinforce"):
        _, grads = rl.rl_grads(_system(), batch, dataclasses.replace(RC, loss=loss), "both")
        assert _grad_norms(grads) == (0.0, 0.0)
    # ... while unequal rewards do move the policy
    adv = rl.ADVANTAGES["grpo"](np.array([[1.0, 0.0, 0.0, 1.0]]))
    _, grads = rl.rl_grads(_system(), batch | {"adv": jnp.asarray(adv[0])}, RC, "both")
    assert min(_grad_norms(grads)) > 1e-6


def test_grpo_and_rloo_values():
    r = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        rl.ADVANTAGES["grpo"](r), [[np.sqrt(3), -1 / np.sqrt(3)] + [-1 / np.sqrt(3)] * 2,
                                   [1, 1, -1, -1]], rtol=1e-4)  # fmt: skip
    np.testing.assert_allclose(
        rl.ADVANTAGES["rloo"](r),
        [[1, -1 / 3, -1 / 3, -1 / 3], [4 / 3, 4 / 3, -4 / 3, -4 / 3]],
        rtol=1e-6,
    )


def test_ppo_ratio_is_one_on_first_epoch_then_moves():
    system, batch = _system(), _rollouts()
    graphdef, state = nnx.split((system, rl.rl_optimizer(system, RC, "both")))
    step = jax.jit(lambda s, b, f: rl.rl_step(graphdef, s, b, f, rc=RC, trainable="both"))
    state, m0, lp = step(state, batch, True)
    assert float(m0["ratio"]) == 1.0 and float(m0["ratio_max"]) == 1.0
    assert float(m0["clip_frac"]) == 0.0
    state, m1, _ = step(state, batch | {"old_lp": lp}, False)
    assert abs(float(m1["ratio"]) - 1.0) > 1e-4  # the first update moved the policy


def test_first_epoch_ppo_gradient_equals_reinforce():
    batch = _rollouts()
    (_, _), g_ppo = rl.rl_grads(_system(), batch, RC, "both")
    rc = dataclasses.replace(RC, loss="reinforce")
    (_, _), g_re = rl.rl_grads(_system(), batch, rc, "both")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_ppo)),
                    jax.tree.leaves(nnx.to_pure_dict(g_re)), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_kl_to_reference_is_zero_for_the_same_policy_and_penalised_otherwise():
    system, batch = _system(), _rollouts()
    lp, _, _ = rl.token_stats(system, batch["tokens"], batch["offset"])
    rc = dataclasses.replace(RC, kl_coef=0.5)
    loss, (m, _) = rl.rl_loss(system, batch | {"ref_lp": lp}, rc, True)
    assert abs(float(m["kl_ref"])) < 1e-6
    loss2, (m2, _) = rl.rl_loss(system, batch | {"ref_lp": lp - 0.3}, rc, True)
    assert float(m2["kl_ref"]) > 0.01
    assert float(loss2) == pytest.approx(float(loss) + 0.5 * float(m2["kl_ref"]), rel=1e-5)


def test_pass_sums_group_tokens_by_pass():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    pass_ = jnp.array([[0, 0, 1, 1, 2]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    total, pmask = rl.pass_sums(x, pass_, mask)
    np.testing.assert_allclose(total[0, :3], [2.0, 7.0, 0.0])
    np.testing.assert_array_equal(pmask[0, :3], [1.0, 1.0, 0.0])


def _teacher(system, batch):
    """The frozen main model's log-distribution for every token, as the RL loop computes it."""
    graphdef, state = nnx.split(system)
    return rl.reference_logprobs(
        graphdef, state, batch["tokens"], batch["offset"], temperature=1, teacher=True
    )


def test_distill_is_kl_from_frozen_main_to_drafter_at_drafted_tokens():
    system, batch = _system(), _rollouts()
    _, teacher = _teacher(_system(seed=1), batch)
    rc = dataclasses.replace(RC, distill=0.5)
    loss, (m, _) = rl.rl_loss(system, batch | {"teacher": teacher}, rc, True)
    main_blv, draft_blkv = system(batch["tokens"])
    draft_lp = np.asarray(jax.nn.log_softmax(draft_blkv, -1))
    t = np.asarray(teacher)
    off, want = np.asarray(batch["offset"]), []
    for b in range(off.shape[0]):
        for l in range(5, off.shape[1]):
            if (o := off[b, l]) > 0:
                s = draft_lp[b, l - 1 - o, o - 1]
                want.append((np.exp(t[b, l]) * (t[b, l] - s)).sum())
    assert float(m["distill_kl"]) == pytest.approx(float(np.mean(want)), rel=1e-4)
    loss0, _ = rl.rl_loss(system, batch, RC, True)
    assert float(loss) == pytest.approx(float(loss0) + 0.5 * float(m["distill_kl"]), rel=1e-5)
    # a teacher equal to the drafter's own distributions: zero
    _, (m_self, _) = rl.rl_loss(system, batch | {"teacher": rl._stats(
        main_blv, draft_blkv, batch["tokens"], batch["offset"], 1.0)[3]}, rc, True)  # fmt: skip
    assert abs(float(m_self["distill_kl"])) < 1e-5


def test_distill_gradient_reaches_main_model_through_the_taps():
    """With no advantage at all, distillation alone trains the drafter and, via h_t, main."""
    batch = _rollouts()
    batch = batch | {"adv": jnp.zeros_like(batch["adv"]), "teacher": _teacher(_system(1), batch)[1]}
    rc = dataclasses.replace(RC, distill=1.0)
    main, drafter = _grad_norms(rl.rl_grads(_system(), batch, rc, "both")[1])
    assert main > 1e-6 and drafter > 1e-6
    main, drafter = _grad_norms(rl.rl_grads(_system(detach=True), batch, rc, "both")[1])
    assert main == 0.0 and drafter > 1e-6
    assert _grad_norms(rl.rl_grads(_system(), batch, RC, "both")[1]) == (0.0, 0.0)  # distill off
