"""The RL objective of the whole system: per-token log-probs, policy losses, KL, distillation.

The policy is main model + drafter. A main pass at position t emits y_0 =
x_{t+1} (main model) and, in fast mode, drafts y_1..y_k = x_{t+2..t+1+k}
(drafter reading h_t), so the log-prob of a pass is

    log p_main(y_0 | x_<=t) + sum_j log p_draft(y_j | h_t, y_0..y_{j-1})

and its gradient reaches the main model through the residual stream h_t that
the drafter reads (unless the taps are detached). A rollout is scored by one
teacher-forced forward over its tokens: for the token at row position t with
offset o in its pass (the engine's `offset`), o = 0 picks the main
distribution at t - 1 and o = j >= 1 the drafter's at (t - 1 - j, j - 1): one
gather, no loop over positions.

`POLICY_LOSSES` by name score passes against their rollout's advantage
('ppo': the clipped ratio of Schulman et al. 2017, per pass; 'reinforce').
The first update on a batch is on-policy: its old log-probs are the current
ones under stop_gradient, so the PPO ratio is exactly 1 there; later epochs
reuse the log-probs that first update returned.

Batch of rollouts (`mtp.rl.rollouts.Rollouts.batch`), all (B, T) but `adv`:
  tokens  int: <bos> prompt <think> thought </think> answer <eos>, pad after
  offset  int: 0 for a main token, j for a draft at offset j
  pass_   int: index of the emitting pass within the row (0, 1, ...)
  mask    float: 1 where the policy chose the token (not the prompt, not a
          forced </think>, not pads; 0 on whole rows that are skipped)
  adv     float (B,): the rollout's advantage
  old_lp, ref_lp  float: log-probs of the rollout policy / frozen reference
  teacher  float (B, T, V), only with rl.distill: the frozen reference main
          model's log-distribution for token t (computed at t - 1)
  urgency  float (B,), optional: the urgency input of the forward (and of the
          keep head)
  stop    float (B, T), optional (learned emission): the policy ended its pass
          after the token

With `rl.distill` > 0 the loss adds, at every drafted token, the KL from that
teacher to the drafter's distribution on the states the rollout visited
(on-policy distillation, DistillSpec, Zhou et al. 2024).

With learned emission (`drafter.emission`, batches with `stop`) a pass's
log-prob also holds its keep decisions: log sigmoid(s) for every draft it
emitted and log sigmoid(-s) for the stop after its last token, s the keep
head's logit on the drafter state that scored that draft (`emission_logprob`),
so the decisions' gradient reaches the keep head, the drafter and, through
the taps, the main model. A rollout kind may replace the log-prob of the
tokens where its policy chose something other than the token itself
(`token_logprob`; the pause decision of `mtp.rl.rollouts.PauseRollout`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from mtp.model.system import Drafts, to_full_vocab

POLICY_LOSSES: dict[str, Callable] = {}

# (logits_btv of the main model at t - 1, batch, lp_bt, temperature) -> lp_bt
TokenLogprob = Callable[[jax.Array, dict, jax.Array, float], jax.Array]


def register(name: str):
    def add(fn):
        POLICY_LOSSES[name] = fn
        return fn

    return add


def previous(x_bt_):
    """x at t - 1 for every t (row 0 repeats itself)."""
    return jnp.concatenate([x_bt_[:, :1], x_bt_[:, :-1]], axis=1)


def token_dists(logits_btv, draft, offset_bt, temperature: float):
    """Log-distribution (B, T, V) that emitted each token, and the main model's at t - 1.

    Offset 0: the main model's at t - 1; offset j >= 1: the drafter's at
    (t - 1 - j, step j - 1), -inf outside a trimmed draft vocabulary. Row position 0
    is garbage; mask it. `draft`: a `Drafts` (scored one offset at a time, the
    backward pass too) or draft logits (B, T, k, V).
    """
    drafts = draft if isinstance(draft, Drafts) else Drafts.from_logits(draft)
    t = offset_bt.shape[1]
    main_lp_btv = jax.nn.log_softmax(logits_btv / temperature)
    main_prev_btv = previous(main_lp_btv)  # main distribution for token t lives at t - 1

    @jax.checkpoint
    def emitted(h_btd, j):
        """The drafter's law at step j for the token at t, read at t - 2 - j (B, T, V)."""
        lp_btu = jax.nn.log_softmax(drafts.logits(h_btd) / temperature)
        lp_btv = to_full_vocab(lp_btu, drafts.ids_u, drafts.vocab_size, -jnp.inf)
        return lp_btv[:, jnp.clip(jnp.arange(t) - 2 - j, 0, t - 1)]

    def offset(dist_btv, xs):
        h_btd, j = xs
        return jnp.where((offset_bt == j + 1)[..., None], emitted(h_btd, j), dist_btv), None

    dist_btv, _ = jax.lax.scan(offset, main_prev_btv, drafts.per_offset())
    return dist_btv, main_prev_btv


def emission_logprob(keep_btk, offset_bt, stop_bt):
    """Log-prob (B, T) of the keep decisions at each token, from keep logits (B, T, K) on the
    teacher-forced drafter states (the state at (t, j) scores draft j + 1 of a pass drafting
    from t). A draft at t with offset j >= 1 was kept: log sigmoid(keep[t - 1 - j, j - 1]). A
    token at t with offset o < K after which the pass stopped: log sigmoid(-keep[t - 1 - o, o])
    (the state that would have scored draft o + 1, fed the pass's tokens up to t)."""
    t, k = offset_bt.shape[1], keep_btk.shape[2]
    at = lambda back, j: keep_btk[:, jnp.clip(jnp.arange(t) - 1 - back, 0, t - 1), j]
    out_bt = jnp.zeros(offset_bt.shape, jnp.float32)
    for j in range(1, k + 1):
        out_bt += jnp.where(offset_bt == j, jax.nn.log_sigmoid(at(j, j - 1)), 0.0)
    for o in range(k):
        stopped_bt = (offset_bt == o) & (stop_bt > 0)
        out_bt += jnp.where(stopped_bt, jax.nn.log_sigmoid(-at(o, o)), 0.0)
    return out_bt


def token_stats(system, batch: dict, temperature: float = 1.0, token_logprob=None):
    """Per-token statistics of a batch under `system`'s teacher-forced forward.

    Returns lp_bt (B, T): log-prob of each token under the distribution that
    emitted it (or `token_logprob`'s replacement); ent_bt (B, T): that
    distribution's entropy; agree_bt (B, T): the token equals the main model's
    own greedy choice at its position (for a draft: what speculative decoding
    accepts); dist_btv and main_prev_btv (B, T, V): the emitting and the main
    log-distributions.
    """
    tokens_bt = batch["tokens"]
    logits_btv, drafts = system.forward(tokens_bt, batch.get("urgency"))
    dist_btv, main_prev_btv = token_dists(logits_btv, drafts, batch["offset"], temperature)
    lp_bt = jnp.take_along_axis(dist_btv, tokens_bt[..., None], -1)[..., 0]
    if token_logprob is not None:
        lp_bt = token_logprob(previous(logits_btv), batch, lp_bt, temperature)
    if "stop" in batch:
        u = batch.get("urgency")
        u_btk = (
            None if u is None else jnp.broadcast_to(u[:, None, None], drafts.hidden_btkd.shape[:3])
        )
        keep_btk = system.keep_logits(drafts.hidden_btkd, u_btk)
        lp_bt = lp_bt + emission_logprob(keep_btk, batch["offset"], batch["stop"])
    inside_btv = dist_btv > -jnp.inf  # a trimmed drafter gives no mass outside its vocabulary
    safe_btv = jnp.where(inside_btv, dist_btv, 0.0)
    ent_bt = -(jnp.exp(safe_btv) * safe_btv * inside_btv).sum(-1)
    agree_bt = tokens_bt == jnp.argmax(main_prev_btv, -1)
    return lp_bt, ent_bt, agree_bt, dist_btv, main_prev_btv


def distill_kl(dist_btv, teacher_btv, draft_mask_bt):
    """Mean KL(teacher || drafter) over the masked drafted tokens; both log-distributions.
    Where the drafter gives no mass (-inf: outside a trimmed draft vocabulary) the teacher is
    restricted to the drafter's tokens, renormalised."""
    inside_btv = dist_btv > -jnp.inf
    teacher_btv = jnp.where(inside_btv, teacher_btv, -jnp.inf)
    teacher_btv = teacher_btv - jax.nn.logsumexp(teacher_btv, -1, keepdims=True)
    safe_btv = jnp.where(inside_btv, teacher_btv - dist_btv, 0.0)
    kl_bt = (jnp.exp(teacher_btv) * safe_btv).sum(-1)
    return (kl_bt * draft_mask_bt).sum() / jnp.maximum(draft_mask_bt.sum(), 1.0)


def kl_k3(lp_bt, ref_lp_bt, mask_bt):
    """Mean k3 estimate of KL(policy || reference) per token (Schulman 2020): with
    d = log ref - log policy at tokens sampled from the policy, exp(d) - d - 1 >= 0, unbiased."""
    d_bt = ref_lp_bt - lp_bt
    return ((jnp.exp(d_bt) - d_bt - 1) * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)


def pass_sums(x_bt, pass_bt, mask_bt):
    """(B, T) per-token values summed over each pass -> (B, P) indexed by pass, and its mask."""
    b, t = x_bt.shape
    seg_bt = jnp.arange(b)[:, None] * t + jnp.clip(pass_bt, 0, t - 1)
    total = jax.ops.segment_sum((x_bt * mask_bt).ravel(), seg_bt.ravel(), num_segments=b * t)
    count = jax.ops.segment_sum(mask_bt.ravel(), seg_bt.ravel(), num_segments=b * t)
    return total.reshape(b, t), (count > 0).reshape(b, t).astype(jnp.float32)


@register("ppo")
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


@register("reinforce")
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


def rl_loss(system, batch, rl_config, first_epoch, token_logprob: TokenLogprob | None = None):
    """Policy loss (+ KL penalty, + distillation) of a batch of rollouts.

    Returns (loss, (metrics, lp_bt)). `first_epoch` (traced bool): use the
    current log-probs, stop-gradient, as the old ones (on-policy: ratio exactly
    1); else `batch['old_lp']`. `rl_config`: the `rl` config section.
    """
    offset_bt, mask_bt = batch["offset"], batch["mask"]
    lp_bt, ent_bt, agree_bt, dist_btv, _ = token_stats(
        system, batch, rl_config.temperature, token_logprob
    )
    old_bt = jnp.where(first_epoch, jax.lax.stop_gradient(lp_bt), batch["old_lp"])
    lp_bp, pmask_bp = pass_sums(lp_bt, batch["pass_"], mask_bt)
    old_bp, _ = pass_sums(old_bt, batch["pass_"], mask_bt)
    loss, metrics = POLICY_LOSSES[rl_config.loss](
        lp_bp, old_bp, batch["adv"], pmask_bp, rl_config.clip_eps
    )
    kl = kl_k3(lp_bt, batch["ref_lp"], mask_bt)
    metrics["policy_loss"] = loss
    if rl_config.kl_coef:
        loss = loss + rl_config.kl_coef * kl
    if rl_config.distill:
        distill = distill_kl(dist_btv, batch["teacher"], mask_bt * (offset_bt > 0))
        metrics["distill_kl"] = distill
        loss = loss + rl_config.distill * distill
    metrics["loss"] = loss
    metrics["kl_ref"] = kl
    metrics["entropy"] = (ent_bt * mask_bt).sum() / jnp.maximum(mask_bt.sum(), 1.0)
    for j in range(1, system.k + 1):  # drafts agreeing with the main model's greedy choice
        m_bt = mask_bt * (offset_bt == j)
        metrics[f"agree_{j}"] = (agree_bt * m_bt).sum() / jnp.maximum(m_bt.sum(), 1.0)
    m_bt = mask_bt * (offset_bt > 0)
    metrics["agree"] = (agree_bt * m_bt).sum() / jnp.maximum(m_bt.sum(), 1.0)
    return loss, (metrics, lp_bt)
