"""The RL objective of the whole system: per-token log-probs, advantages, policy losses.

The policy is main model + drafter. A main pass at position t emits y_0 =
x_{t+1} (main model) and, in fast mode, drafts y_1..y_k = x_{t+2..t+1+k}
(drafter reading h_t), so the log-prob of a pass is

    log p_main(y_0 | x_<=t) + sum_j log p_draft(y_j | h_t, y_0..y_{j-1})

and its gradient reaches the main model through the residual stream h_t that
the drafter reads (unless `drafter.detach`). A rollout is scored by one
teacher-forced forward over its tokens: for the token at row position l with
offset o in its pass (the engine's `offset`), o = 0 picks the main
distribution at l - 1 and o = j >= 1 the drafter's at (t = l - 1 - j, j - 1)
— one gather, no loop over positions.

Pieces by name (small registries, as tunix does): `ADVANTAGES` turns the
rewards of each group of rollouts of one prompt into advantages (GRPO, Shao et
al. 2024; RLOO, Ahmadian et al. 2024); `POLICY_LOSSES` scores passes against
them ('ppo': the clipped ratio of Schulman et al. 2017, per pass; 'reinforce').
The first update on a batch is on-policy: its old log-probs are the current
ones under stop_gradient, so the PPO ratio is exactly 1 there; later epochs
reuse the log-probs that first update returned.

Batch of rollouts (`rl_rollout.Rollouts.batch`), all (B, L) but `adv`:
  tokens  int: <bos> prompt <think> thought </think> answer <eos>, PAD after
  offset  int: 0 for a main token, j for a draft at offset j
  pass_   int: index of the emitting pass within the row (0, 1, ...)
  mask    float: 1 where the policy sampled the token (not the prompt, not
          a forced </think>, not pads; 0 on whole rows that are skipped)
  adv     float (B,): the rollout's advantage
  old_lp, ref_lp  float: log-probs of the rollout policy / frozen reference
  teacher  float (B, L, V), only with rl.distill: the frozen reference main
          model's log-distribution for token l (computed at l - 1)

With `rl.distill` > 0 the loss adds, at every drafted token, the KL from that
teacher to the drafter's distribution on the states the rollout visited
(on-policy distillation, DistillSpec, Zhou et al. 2024): a dense, per-token
signal where the sequence reward only says that some draft went wrong. It
reaches the main model through the taps, like the policy gradient.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mtp.config import RLConfig
from mtp.data.tokenizer import PAUSE_ID

EPS = 1e-6

# ---------------------------------------------------------------- advantages

ADVANTAGES: dict[str, Callable] = {}
POLICY_LOSSES: dict[str, Callable] = {}


def register(registry: dict, name: str):
    def wrap(fn):
        registry[name] = fn
        return fn

    return wrap


@register(ADVANTAGES, "grpo")
def grpo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) rewards of G groups of n rollouts -> (r - group mean) / (group std + eps).

    Equal rewards in a group give zero advantages, hence no gradient from it.
    """
    r = np.asarray(rewards_gn, np.float64)
    return ((r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + EPS)).astype(np.float32)


@register(ADVANTAGES, "rloo")
def rloo_advantages(rewards_gn: np.ndarray) -> np.ndarray:
    """(G, n) -> r_i minus the mean reward of the other n - 1 rollouts of its group."""
    r = np.asarray(rewards_gn, np.float64)
    n = r.shape[1]
    baseline = (r.sum(1, keepdims=True) - r) / (n - 1)
    return (r - baseline).astype(np.float32)


# ---------------------------------------------------------------- log-probs


def token_dists(system, tokens_bl, offset_bl, temperature: float = 1.0, urgency_b=None):
    """Log-distribution (B, L, V) that emitted each token, and the main one at l - 1.

    Offset 0: the main model's at l - 1; offset j >= 1: the drafter's at
    (t = l - 1 - j, step j - 1). Rows at position 0 are garbage; mask them.
    `urgency_b` (B,): the urgency input of a model with `use_urgency` (pause RL).
    """
    return _dists(*system(tokens_bl, urgency_b), offset_bl, temperature)


def _previous(x_bl_):
    """x at l - 1 for every l (row 0 repeats itself)."""
    return jnp.concatenate([x_bl_[:, :1], x_bl_[:, :-1]], axis=1)


def _dists(logits_blv, draft_blkv, offset_bl, temperature):
    b, l, k, _ = draft_blkv.shape
    main_lp_blv = jax.nn.log_softmax(logits_blv / temperature)
    draft_lp_blkv = jax.nn.log_softmax(draft_blkv / temperature)
    # main distribution for token l lives at l - 1
    main_prev_blv = _previous(main_lp_blv)
    t_bl = jnp.clip(jnp.arange(l) - 1 - offset_bl, 0, l - 1)
    j_bl = jnp.clip(offset_bl - 1, 0, k - 1)
    draft_sel_blv = draft_lp_blkv[jnp.arange(b)[:, None], t_bl, j_bl]  # (B, L, V)
    dist_blv = jnp.where((offset_bl == 0)[..., None], main_prev_blv, draft_sel_blv)
    return dist_blv, main_prev_blv


def token_stats(
    system, tokens_bl, offset_bl, temperature: float = 1.0, urgency_b=None, decision_bl=None
):
    """Per-token log-prob (B, L) of each token under the distribution that emitted it.

    Where `decision_bl` (B, L) is set, the policy's choice there was only whether
    to pause (the answer token itself greedy; `mtp.decode.pause`): its log-prob
    is that of the decision (`pause_decision_logprob`).
    Also returns the entropy (B, L) of that distribution and whether the token
    equals the main model's own greedy choice at its position (B, L) — for a
    draft, the agreement with the main model that speculative decoding checks.
    """
    return _stats(*system(tokens_bl, urgency_b), tokens_bl, offset_bl, temperature, decision_bl)[:3]


def _stats(logits_blv, draft_blkv, tokens_bl, offset_bl, temperature, decision_bl=None):
    """token_stats from the system's outputs, plus the emitting and the main model's
    log-distributions (B, L, V) for each token."""
    dist_blv, main_prev_blv = _dists(logits_blv, draft_blkv, offset_bl, temperature)
    lp_bl = jnp.take_along_axis(dist_blv, tokens_bl[..., None], -1)[..., 0]
    if decision_bl is not None:
        dec_bl = pause_decision_logprob(_previous(logits_blv), tokens_bl, temperature)
        lp_bl = jnp.where(decision_bl > 0, dec_bl, lp_bl)
    ent_bl = -(jnp.exp(dist_blv) * dist_blv).sum(-1)
    agree_bl = tokens_bl == jnp.argmax(main_prev_blv, -1)
    return lp_bl, ent_bl, agree_bl, dist_blv, main_prev_blv


def distill_kl(dist_blv, teacher_blv, draft_mask_bl):
    """Mean KL(teacher || drafter) over the masked drafted tokens; both log-distributions."""
    kl_bl = (jnp.exp(teacher_blv) * (teacher_blv - dist_blv)).sum(-1)
    return (kl_bl * draft_mask_bl).sum() / jnp.maximum(draft_mask_bl.sum(), 1.0)


def pause_decision_logprob(logits_blv, tokens_bl, temperature: float = 1.0):
    """(B, L) log-prob of the decision to pause (token <pause>) or not (any other token).

    Valued log p(<pause>) or log(1 - p(<pause>)) under softmax(logits / T), but
    differentiated through the pause logit only (the others' log-sum-exp is held
    fixed): a decision's advantage moves how readily the model pauses, not which
    answer token it ranks first, since the answer itself was not sampled.
    """
    z_blv = logits_blv / temperature
    rest_bl = jax.lax.stop_gradient(jax.nn.logsumexp(z_blv.at[..., PAUSE_ID].set(-jnp.inf), -1))
    d_bl = z_blv[..., PAUSE_ID] - rest_bl  # log-odds of pausing
    return jnp.where(tokens_bl == PAUSE_ID, jax.nn.log_sigmoid(d_bl), jax.nn.log_sigmoid(-d_bl))


def pass_sums(x_bl, pass_bl, mask_bl):
    """(B, L) per-token values summed over each pass -> (B, L) indexed by pass, and its mask."""
    b, l = x_bl.shape
    seg_bl = jnp.arange(b)[:, None] * l + jnp.clip(pass_bl, 0, l - 1)
    total = jax.ops.segment_sum((x_bl * mask_bl).ravel(), seg_bl.ravel(), num_segments=b * l)
    count = jax.ops.segment_sum(mask_bl.ravel(), seg_bl.ravel(), num_segments=b * l)
    return total.reshape(b, l), (count > 0).reshape(b, l).astype(jnp.float32)


# ---------------------------------------------------------------- policy losses


@register(POLICY_LOSSES, "ppo")
def ppo_clip_loss(lp_bp, old_bp, adv_b, mask_bp, clip_eps: float):
    """Clipped surrogate per pass, averaged over the batch's passes. Returns (loss, metrics)."""
    ratio_bp = jnp.exp(lp_bp - old_bp)
    a_b1 = adv_b[:, None]
    surr_bp = jnp.minimum(ratio_bp * a_b1, jnp.clip(ratio_bp, 1 - clip_eps, 1 + clip_eps) * a_b1)
    n = jnp.maximum(mask_bp.sum(), 1.0)
    clipped = (jnp.abs(ratio_bp - 1) > clip_eps).astype(jnp.float32)
    return -(surr_bp * mask_bp).sum() / n, {
        "ratio": (ratio_bp * mask_bp).sum() / n,
        "ratio_max": jnp.max(jnp.where(mask_bp > 0, ratio_bp, 0.0)),
        "clip_frac": (clipped * mask_bp).sum() / n,
    }


@register(POLICY_LOSSES, "reinforce")
def reinforce_loss(lp_bp, old_bp, adv_b, mask_bp, clip_eps: float):
    """-A * log p(pass), averaged over passes (the on-policy gradient; no ratio, no clip)."""
    del clip_eps
    n = jnp.maximum(mask_bp.sum(), 1.0)
    ratio_bp = jnp.exp(lp_bp - old_bp)
    return -(lp_bp * adv_b[:, None] * mask_bp).sum() / n, {
        "ratio": (ratio_bp * mask_bp).sum() / n,
        "ratio_max": jnp.max(jnp.where(mask_bp > 0, ratio_bp, 0.0)),
        "clip_frac": jnp.zeros(()),
    }


def rl_loss(system, batch, rc: RLConfig, first_epoch):
    """Policy loss (+ KL penalty) of a batch of rollouts. Returns (loss, (metrics, lp_bl)).

    `first_epoch` (traced bool): use the current log-probs, stop-gradient, as the
    old ones (on-policy: ratio exactly 1); else `batch['old_lp']`.
    """
    tokens_bl, offset_bl, mask_bl = batch["tokens"], batch["offset"], batch["mask"]
    lp_bl, ent_bl, agree_bl, dist_blv, _ = _stats(
        *system(tokens_bl, batch.get("urgency")), tokens_bl, offset_bl, rc.temperature,
        batch.get("decision"),
    )  # fmt: skip
    old_bl = jnp.where(first_epoch, jax.lax.stop_gradient(lp_bl), batch["old_lp"])
    lp_bp, pmask_bp = pass_sums(lp_bl, batch["pass_"], mask_bl)
    old_bp, _ = pass_sums(old_bl, batch["pass_"], mask_bl)
    loss, metrics = POLICY_LOSSES[rc.loss](lp_bp, old_bp, batch["adv"], pmask_bp, rc.clip_eps)
    n_tok = jnp.maximum(mask_bl.sum(), 1.0)
    # k3 estimator of KL(policy || reference), per token (Schulman 2020): >= 0, unbiased
    d_bl = batch["ref_lp"] - lp_bl
    kl = ((jnp.exp(d_bl) - d_bl - 1) * mask_bl).sum() / n_tok
    metrics["policy_loss"] = loss
    if rc.kl_coef:
        loss = loss + rc.kl_coef * kl
    if rc.distill:
        distill = distill_kl(dist_blv, batch["teacher"], mask_bl * (offset_bl > 0))
        metrics["distill_kl"] = distill
        loss = loss + rc.distill * distill
    metrics["loss"] = loss
    metrics["kl_ref"] = kl
    metrics["entropy"] = (ent_bl * mask_bl).sum() / n_tok
    k = system.k
    offset_bl = batch["offset"]
    for j in range(1, k + 1):  # drafts agreeing with the main model's greedy choice
        m = mask_bl * (offset_bl == j)
        metrics[f"agree_{j}"] = (agree_bl * m).sum() / jnp.maximum(m.sum(), 1.0)
    m = mask_bl * (offset_bl > 0)
    metrics["agree"] = (agree_bl * m).sum() / jnp.maximum(m.sum(), 1.0)
    return loss, (metrics, lp_bl)


# ---------------------------------------------------------------- state and steps

TRAINABLE = {
    "both": nnx.Param,
    "drafter": nnx.All(nnx.Param, nnx.PathContains("drafter")),
    "main": nnx.All(nnx.Param, nnx.PathContains("main")),
}


def make_rl_optimizer(rc: RLConfig) -> optax.GradientTransformation:
    warm = max(rc.warmup_steps, 1)
    schedule = lambda count: rc.lr * jnp.minimum(1.0, (count + 1) / warm)  # first step > 0
    return optax.chain(
        optax.clip_by_global_norm(rc.grad_clip),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=rc.weight_decay),
    )


def rl_optimizer(system, rc: RLConfig, trainable: str) -> nnx.Optimizer:
    """AdamW over the `trainable` part only ('both', 'drafter', 'main')."""
    return nnx.Optimizer(system, make_rl_optimizer(rc), wrt=TRAINABLE[trainable])


def rl_grads(system, batch, rc: RLConfig, trainable: str, first_epoch=True):
    """(loss, (metrics, lp_bl)), grads w.r.t. the trainable parameters only."""
    grad_fn = nnx.value_and_grad(
        rl_loss, argnums=nnx.DiffState(0, TRAINABLE[trainable]), has_aux=True
    )
    return grad_fn(system, batch, rc, first_epoch)


def rl_step(graphdef, state, batch, first_epoch, *, rc: RLConfig, trainable: str):
    """One update of (system, optimizer). Returns (state, metrics, lp_bl before the update)."""
    system, optimizer = nnx.merge(graphdef, state)
    (_, (metrics, lp_bl)), grads = rl_grads(system, batch, rc, trainable, first_epoch)
    metrics["grad_norm"] = optax.global_norm(grads)
    optimizer.update(system, grads)
    return nnx.state((system, optimizer)), metrics, lp_bl


def reference_logprobs(
    graphdef, state, tokens_bl, offset_bl, *, temperature: float, teacher: bool = False
):
    """Per-token log-probs (B, L) under a frozen system (the KL reference), and with `teacher`
    its main model's log-distribution (B, L, V) for each token (the distillation teacher)."""
    system = nnx.merge(graphdef, state)
    lp_bl, _, _, _, teacher_blv = _stats(*system(tokens_bl), tokens_bl, offset_bl, temperature)
    return lp_bl, (teacher_blv if teacher else None)


def jit_rl_steps(graphdef, ref_graphdef, rc: RLConfig, trainable: str):
    """Jitted (rl_step, reference_logprobs); the train state is donated."""
    step = jax.jit(
        functools.partial(rl_step, graphdef, rc=rc, trainable=trainable), donate_argnums=0
    )
    ref = jax.jit(
        functools.partial(
            reference_logprobs, ref_graphdef, temperature=rc.temperature, teacher=rc.distill > 0
        )
    )
    return step, ref
