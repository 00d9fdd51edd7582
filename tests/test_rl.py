"""RL math on hand-built rollouts: tempered log-probs, gradient paths, GRPO/RLOO, PPO, KL."""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, RLConfig
from mtp.decode.sampling import Sampling, log_probs
from mtp.model.system import MTPSystem
from mtp.rl import objectives, steps
from mtp.rl.advantages import ADVANTAGES
from mtp.rl.selection import group_advantages

MAIN = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
K = 2
T = 0.7  # the rollout temperature: log-probs must be of the same tempered policy
RC = RLConfig(temperature=T, ppo_epochs=2, clip_eps=0.2, lr=1e-2, warmup_steps=0)


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


def _lp(system, batch, temperature=T):
    return objectives.token_stats(system, batch, temperature)[0]


def test_token_logprobs_are_of_the_tempered_emitting_distribution():
    """Token l at offset o: the main model's law at l - 1 (o = 0) or the drafter's at
    (l - 1 - o, o - 1), both as the sampler draws at temperature T."""
    system, batch = _system(), _rollouts()
    logits_btv, draft_btkv = system(batch["tokens"])
    main_lp = log_probs(logits_btv, Sampling(temperature=T))
    draft_lp = log_probs(draft_btkv, Sampling(temperature=T))
    _, (_, loss_lp) = objectives.rl_loss(system, batch, RC, True)  # what the loss trains on
    lp, ent, _, _, _ = objectives.token_stats(system, batch, T)
    tok, off = np.asarray(batch["tokens"]), np.asarray(batch["offset"])
    for b in range(2):
        for l in range(5, 20):
            o, x = off[b, l], tok[b, l]
            want = main_lp[b, l - 1, x] if o == 0 else draft_lp[b, l - 1 - o, o - 1, x]
            np.testing.assert_allclose(lp[b, l], want, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(loss_lp[b, l], want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(ent)[:, 5:] > 0)
    assert np.abs(np.asarray(lp - _lp(system, batch, 1.0))[:, 5:]).min() > 1e-3  # T matters


def test_policy_gradient_reaches_main_model_through_drafter():
    """Only drafted tokens carry advantage: the main model still gets a gradient via h_t."""
    batch = _rollouts()
    batch["mask"] = batch["mask"] * (batch["offset"] > 0)  # main tokens out of the loss
    _, grads = steps.rl_grads(_system(), batch, RC, "both")
    main, drafter = _grad_norms(grads)
    assert main > 1e-6 and drafter > 1e-6

    _, grads = steps.rl_grads(_system(detach=True), batch, RC, "both")
    main, drafter = _grad_norms(grads)
    assert main == 0.0 and drafter > 1e-6


def test_trainable_drafter_gives_no_main_gradient():
    _, grads = steps.rl_grads(_system(), _rollouts(), RC, "drafter")
    main, drafter = _grad_norms(grads)
    assert main == 0.0 and drafter > 1e-6


def test_equal_rewards_in_a_group_give_zero_grpo_gradient():
    rewards = np.array([[1.0, 1.0, 1.0, 1.0]], np.float32)
    adv = ADVANTAGES["grpo"](rewards)
    np.testing.assert_array_equal(adv, 0.0)
    batch = _rollouts() | {"adv": jnp.asarray(adv[0])}
    for loss in ("ppo", "reinforce"):
        _, grads = steps.rl_grads(_system(), batch, dataclasses.replace(RC, loss=loss), "both")
        assert _grad_norms(grads) == (0.0, 0.0)
    # ... while unequal rewards do move the policy
    adv = ADVANTAGES["grpo"](np.array([[1.0, 0.0, 0.0, 1.0]]))
    _, grads = steps.rl_grads(_system(), batch | {"adv": jnp.asarray(adv[0])}, RC, "both")
    assert min(_grad_norms(grads)) > 1e-6


def test_grpo_and_rloo_values():
    r = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    np.testing.assert_allclose(
        ADVANTAGES["grpo"](r), [[np.sqrt(3), -1 / np.sqrt(3)] + [-1 / np.sqrt(3)] * 2,
                                [1, 1, -1, -1]], rtol=1e-4)  # fmt: skip
    np.testing.assert_allclose(
        ADVANTAGES["rloo"](r),
        [[1, -1 / 3, -1 / 3, -1 / 3], [4 / 3, 4 / 3, -4 / 3, -4 / 3]],
        rtol=1e-6,
    )


def test_a_larger_pass_price_gives_a_larger_advantage_gap():
    """Four right rollouts, two of 10 main passes and two of 11: the default advantage of a
    priced run (RLOO) and Dr. GRPO scale their gap with the price; GRPO's std division gives
    the same +-1 at any price."""
    passes = np.array([10, 11, 10, 11])

    def gap(price, advantage="auto"):
        ro = types.SimpleNamespace(
            prompts=["p"] * 4, bad=np.zeros(4, bool), rewards=1.0 - price * passes, errors=[]
        )
        rc = RLConfig(pass_price=price, advantage=advantage)
        adv, _ = group_advantages(ro, 4, rc)
        return adv[passes == 10].mean() - adv[passes == 11].mean()

    for advantage in ("auto", "rloo", "drgrpo"):
        small, large = gap(0.01, advantage), gap(0.1, advantage)
        assert small > 0 and large == pytest.approx(10 * small, rel=1e-4), advantage
    assert gap(0.01) == pytest.approx(4 / 3 * 0.01, rel=1e-4)  # RLOO: 0.01 * n / (n - 1)
    assert gap(0.01, "grpo") == pytest.approx(gap(0.1, "grpo"), rel=1e-3)  # blind to the price
    np.testing.assert_allclose(
        ADVANTAGES["drgrpo"](np.array([[1.0, 0.0, 0.0, 0.0]])), [[0.75, -0.25, -0.25, -0.25]]
    )


def test_ppo_ratio_is_one_on_first_epoch_then_moves():
    system, batch = _system(), _rollouts()
    graphdef, state = nnx.split((system, steps.rl_optimizer(system, RC, "both")))
    step = jax.jit(lambda s, b, f: steps.rl_step(graphdef, s, b, f, rl_config=RC, trainable="both"))
    state, m0, lp = step(state, batch, True)
    assert float(m0["ratio"]) == 1.0 and float(m0["ratio_max"]) == 1.0
    assert float(m0["clip_frac"]) == 0.0
    state, m1, _ = step(state, batch | {"old_lp": lp}, False)
    assert abs(float(m1["ratio"]) - 1.0) > 1e-4  # the first update moved the policy


def test_first_epoch_ppo_gradient_equals_reinforce():
    batch = _rollouts()
    (_, _), g_ppo = steps.rl_grads(_system(), batch, RC, "both")
    rl_config = dataclasses.replace(RC, loss="reinforce")
    (_, _), g_re = steps.rl_grads(_system(), batch, rl_config, "both")
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(g_ppo)),
                    jax.tree.leaves(nnx.to_pure_dict(g_re)), strict=True):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_ppo_clip_value_and_gradient_per_pass_by_hand():
    """surrogate = min(r A, clip(r, 1 - eps, 1 + eps) A) per pass. A pass whose ratio left
    the range on the side its advantage pushes toward gets no gradient; on the other side
    the unclipped r A is kept (the pessimistic bound), and so is its gradient r A."""
    eps = 0.2
    ratio_bp = np.array([[1.5, 0.5, 1.1], [1.5, 0.5, 0.9]], np.float32)
    adv_b = np.array([1.0, -2.0], np.float32)
    mask_bp = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
    old_bp = np.full_like(ratio_bp, -3.0)
    lp_bp = jnp.asarray(old_bp + np.log(ratio_bp))
    a_b1 = adv_b[:, None]
    surr_bp = np.minimum(ratio_bp * a_b1, np.clip(ratio_bp, 1 - eps, 1 + eps) * a_b1)
    n = mask_bp.sum()
    clipped_bp = ((a_b1 > 0) & (ratio_bp > 1 + eps)) | ((a_b1 < 0) & (ratio_bp < 1 - eps))
    assert clipped_bp.tolist() == [[True, False, False], [False, True, False]]
    loss_fn = lambda lp: objectives.ppo_clip_loss(lp, old_bp, adv_b, mask_bp, eps)
    (loss, metrics), grad_bp = jax.value_and_grad(loss_fn, has_aux=True)(lp_bp)
    assert float(loss) == pytest.approx(-(surr_bp * mask_bp).sum() / n, rel=1e-5)
    # d/d lp of -r A / n is -r A / n: zero where clipped, and where masked out
    want_bp = np.where(clipped_bp, 0.0, -ratio_bp * a_b1 / n) * mask_bp
    np.testing.assert_allclose(grad_bp, want_bp, rtol=1e-5, atol=1e-7)
    assert float(metrics["clip_frac"]) == pytest.approx(4 / 5)  # passes with |r - 1| > eps


def test_ppo_passes_clipped_on_their_advantages_side_give_no_gradient():
    """Old log-probs that put every pass of a positive-advantage rollout at ratio 1.5 and
    of a negative one at 0.6: each is clipped where its advantage pushes, no gradient at all.
    The mirror image (1.5 for negative, 0.6 for positive) keeps every gradient."""
    system, batch = _system(), _rollouts()
    lp = jax.lax.stop_gradient(_lp(system, batch))
    pos_b = np.asarray(batch["adv"]) > 0
    per_token = lambda r_b: jnp.asarray(np.log(r_b) / (K + 1))[:, None]  # passes: k + 1 tokens
    clipped = batch | {"old_lp": lp - per_token(np.where(pos_b, 1.5, 0.6))}
    (_, (m, _)), grads = steps.rl_grads(system, clipped, RC, "both", first_epoch=False)
    assert float(m["clip_frac"]) == 1.0
    assert _grad_norms(grads) == (0.0, 0.0)
    kept = batch | {"old_lp": lp - per_token(np.where(pos_b, 0.6, 1.5))}
    (loss, (m, _)), grads = steps.rl_grads(system, kept, RC, "both", first_epoch=False)
    assert float(m["clip_frac"]) == 1.0 and min(_grad_norms(grads)) > 1e-6
    # and the loss is the unclipped -mean(r A) over the passes
    surr_b = np.where(pos_b, 0.6, 1.5) * np.asarray(batch["adv"])
    assert float(m["policy_loss"]) == pytest.approx(-surr_b.mean(), rel=1e-4)


def test_k3_estimates_kl_from_policy_to_reference():
    """Tokens drawn from the policy pi: mean(exp(d) - d - 1), d = log ref - log pi, is
    KL(pi || ref), not KL(ref || pi) (which differs by 0.25 here)."""
    pi, ref = np.array([0.9, 0.05, 0.05]), np.array([0.3, 0.3, 0.4])
    kl = lambda a, b: float((a * np.log(a / b)).sum())
    assert kl(ref, pi) - kl(pi, ref) > 0.2
    x = jax.random.choice(jax.random.key(0), 3, (200_000,), p=jnp.asarray(pi))
    lp, ref_lp = jnp.log(jnp.asarray(pi))[x], jnp.log(jnp.asarray(ref))[x]
    est = float(objectives.kl_k3(lp[None], ref_lp[None], jnp.ones((1, x.size))))
    assert est == pytest.approx(kl(pi, ref), abs=0.02)


def test_kl_to_reference_is_zero_for_the_same_policy_and_penalised_otherwise():
    system, batch = _system(), _rollouts()
    graphdef, state = nnx.split(system)
    lp, _ = steps.reference_logprobs(graphdef, state, batch, temperature=T)  # the frozen copy's
    rl_config = dataclasses.replace(RC, kl_coef=0.5)
    loss, (m, _) = objectives.rl_loss(system, batch | {"ref_lp": lp}, rl_config, True)
    assert abs(float(m["kl_ref"])) < 1e-6
    # a reference 0.3 nats less likely on every token: d = -0.3, exp(d) - d - 1 per token
    loss2, (m2, _) = objectives.rl_loss(system, batch | {"ref_lp": lp - 0.3}, rl_config, True)
    assert float(m2["kl_ref"]) == pytest.approx(np.exp(-0.3) + 0.3 - 1, rel=1e-3)
    assert float(loss2) == pytest.approx(float(loss) + 0.5 * float(m2["kl_ref"]), rel=1e-5)


def test_pass_sums_group_tokens_by_pass():
    x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
    pass_ = jnp.array([[0, 0, 1, 1, 2]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 0.0]])
    total, pmask = objectives.pass_sums(x, pass_, mask)
    np.testing.assert_allclose(total[0, :3], [2.0, 7.0, 0.0])
    np.testing.assert_array_equal(pmask[0, :3], [1.0, 1.0, 0.0])


def _teacher(system, batch):
    """The frozen main model's log-distribution for every token, as the RL loop computes it."""
    graphdef, state = nnx.split(system)
    return steps.reference_logprobs(graphdef, state, batch, temperature=T, teacher=True)


def test_distill_is_kl_from_frozen_main_to_drafter_at_drafted_tokens():
    system, batch = _system(), _rollouts()
    _, teacher = _teacher(_system(seed=1), batch)
    rl_config = dataclasses.replace(RC, distill=0.5)
    loss, (m, _) = objectives.rl_loss(system, batch | {"teacher": teacher}, rl_config, True)
    main_btv, draft_btkv = system(batch["tokens"])
    draft_lp = np.asarray(jax.nn.log_softmax(draft_btkv / T, -1))
    t = np.asarray(teacher)
    # the teacher's law for token l: its main model's at l - 1, at the rollout temperature
    teacher_btv, _ = _system(seed=1)(batch["tokens"])
    np.testing.assert_allclose(t[:, 1:], jax.nn.log_softmax(teacher_btv[:, :-1] / T), atol=1e-5)
    off, want = np.asarray(batch["offset"]), []
    for b in range(off.shape[0]):
        for l in range(5, off.shape[1]):
            if (o := off[b, l]) > 0:
                s = draft_lp[b, l - 1 - o, o - 1]
                want.append((np.exp(t[b, l]) * (t[b, l] - s)).sum())
    assert float(m["distill_kl"]) == pytest.approx(float(np.mean(want)), rel=1e-4)
    loss0, _ = objectives.rl_loss(system, batch, RC, True)
    assert float(loss) == pytest.approx(float(loss0) + 0.5 * float(m["distill_kl"]), rel=1e-5)
    # a teacher equal to the drafter's own distributions: zero
    own = objectives.token_dists(main_btv, draft_btkv, batch["offset"], T)[0]
    _, (m_self, _) = objectives.rl_loss(system, batch | {"teacher": own}, rl_config, True)
    assert abs(float(m_self["distill_kl"])) < 1e-5


def test_distill_gradient_reaches_main_model_through_the_taps():
    """With no advantage at all, distillation alone trains the drafter and, via h_t, main."""
    batch = _rollouts()
    batch = batch | {"adv": jnp.zeros_like(batch["adv"]), "teacher": _teacher(_system(1), batch)[1]}
    rl_config = dataclasses.replace(RC, distill=1.0)
    main, drafter = _grad_norms(steps.rl_grads(_system(), batch, rl_config, "both")[1])
    assert main > 1e-6 and drafter > 1e-6
    main, drafter = _grad_norms(steps.rl_grads(_system(detach=True), batch, rl_config, "both")[1])
    assert main == 0.0 and drafter > 1e-6
    assert _grad_norms(steps.rl_grads(_system(), batch, RC, "both")[1]) == (0.0, 0.0)  # no distill


def _emission_system(detach=False):
    """A system with a keep head whose logit varies with the drafter state and the urgency."""
    cfg = DrafterConfig(k=K, n_heads=2, detach=detach, emission=True)
    system = MTPSystem(MAIN, cfg, pad_id=0, rngs=nnx.Rngs(0))
    kernel = jax.random.normal(jax.random.key(1), system.drafter.keep.kernel.shape)
    system.drafter.keep.kernel.set_value(kernel)
    return system


# passes of 1..K + 1 tokens after a 4-token prompt: (length, stopped by the policy)
EMIT_PASSES = [3, 1, 2, 3, 2, 1, 3, 1]


def _emission_batch(b=2, prompt=4, seed=0):
    rng = np.random.default_rng(seed)
    offset, pass_, stop = [0] * prompt, [0] * prompt, [0] * prompt
    for i, n in enumerate(EMIT_PASSES):
        offset += list(range(n))
        pass_ += [i] * n
        stop += [0] * (n - 1) + [int(n < K + 1)]
    l = len(offset)
    tile = lambda x, dt: np.broadcast_to(np.asarray(x, dt), (b, l)).copy()
    batch = dict(
        tokens=rng.integers(1, MAIN.vocab_size, (b, l)).astype(np.int32),
        offset=tile(offset, np.int32), pass_=tile(pass_, np.int32),
        mask=tile([0] * prompt + [1] * (l - prompt), np.float32),
        stop=tile(stop, np.float32), adv=np.linspace(-1, 1, b).astype(np.float32),
        old_lp=np.zeros((b, l), np.float32), ref_lp=np.zeros((b, l), np.float32),
        urgency=np.array([0.0, 1.0][:b], np.float32),
    )  # fmt: skip
    return {key: jnp.asarray(v) for key, v in batch.items()}


def test_keep_decisions_join_the_pass_logprob():
    """Each pass's log-prob gains log p(keep) for every draft it emitted and log p(stop) after
    its last token when shorter than 1 + K, read on the incremental drafter's states
    (`system.draft`, fed the pass's own tokens) at the rollout's urgency."""
    system, batch = _emission_system(), _emission_batch()
    without = {key: v for key, v in batch.items() if key != "stop"}
    extra = np.asarray(_lp(system, batch) - _lp(system, without))
    taps = system.main_taps(batch["tokens"])
    tok = np.asarray(batch["tokens"])

    @nnx.jit
    def keep_logits(system, taps_1ld, y0_1, nxt_k, u):
        """The incremental drafter fed the pass's own tokens: keep logits (K,)."""
        _, _, x_1kd = system.draft(taps_1ld, y0_1, lambda logits_bu, j: nxt_k[j][None])
        return system.keep_logits(x_1kd, jnp.full((1, K), u))[0]

    for b in range(2):
        s = 4
        for n in EMIT_PASSES:
            nxt = np.append(tok[b], [0] * (K + 1))[s + 1 : s + 1 + K]  # the tokens it drafted
            args = (taps[b : b + 1, s - 1], tok[b, s][None], nxt, float(b))
            keep_k = np.asarray(keep_logits(system, *args))
            want = np.zeros(n)
            want[1:] += np.log(jax.nn.sigmoid(keep_k[: n - 1]))  # draft j kept on state j - 1
            if n < K + 1:  # stopped: the state that would have scored draft n
                want[-1] += np.log(jax.nn.sigmoid(-keep_k[n - 1]))
            np.testing.assert_allclose(extra[b, s : s + n], want, rtol=1e-4, atol=1e-5)
            s += n


def test_keep_gradient_reaches_the_head_the_drafter_and_main_through_the_taps():
    """The keep decisions' log-prob alone: its gradient reaches the keep head, the drafter
    and, through the taps, the main model; with detached taps, not the main model."""
    batch = _emission_batch()
    u_btk = jnp.broadcast_to(batch["urgency"][:, None, None], (*batch["tokens"].shape, K))

    def decisions(system):
        _, drafts = system.forward(batch["tokens"], batch["urgency"])
        keep_btk = system.keep_logits(drafts.hidden_btkd, u_btk)
        lp_bt = objectives.emission_logprob(keep_btk, batch["offset"], batch["stop"])
        return (lp_bt * batch["mask"]).sum()

    grad = nnx.jit(nnx.grad(decisions))
    for detach in (False, True):
        grads = grad(_emission_system(detach))
        main, drafter = _grad_norms(grads)
        keep = float(jnp.abs(nnx.to_pure_dict(grads)["drafter"]["keep"]["kernel"]).sum())
        assert keep > 1e-6 and drafter > keep
        assert (main == 0.0) if detach else (main > 1e-6)
    # ... and the RL loss trains the keep head
    _, grads = steps.rl_grads(_emission_system(), _emission_batch(), RC, "both")
    assert float(jnp.abs(nnx.to_pure_dict(grads)["drafter"]["keep"]["kernel"]).sum()) > 1e-6


def test_the_keep_head_has_its_own_learning_rate():
    """Adam's first step moves each parameter by about the learning rate: the keep head's by
    keep_lr_scale times the rest's."""
    moved = {}
    for scale in (1.0, 100.0):
        system, batch = _emission_system(), _emission_batch()
        rc = dataclasses.replace(RC, keep_lr_scale=scale, lr=1e-4, grad_clip=1e9)
        before = nnx.to_pure_dict(nnx.state(system, nnx.Param))
        optimizer = steps.rl_optimizer(system, rc, "both")
        _, grads = steps.rl_grads(system, batch, rc, "both")
        optimizer.update(system, grads)
        after = nnx.to_pure_dict(nnx.state(system, nnx.Param))
        moved[scale] = tuple(
            float(jnp.abs(_at(after, keys) - _at(before, keys)).max())
            for keys in (("drafter", "keep", "kernel"), ("main", "embed", "embedding"))
        )
    assert moved[1.0][0] == pytest.approx(1e-4, rel=0.05)
    assert moved[100.0][0] == pytest.approx(1e-2, rel=0.05)
    assert moved[100.0][1] == pytest.approx(moved[1.0][1], rel=1e-3)  # the rest unchanged


def _at(tree, keys):
    for key in keys:
        tree = tree[key]
    return tree
