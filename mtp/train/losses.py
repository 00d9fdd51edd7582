"""Supervised losses: main next-token, drafter multi-token, distillation.

Conventions (see `mtp.model.system`): main logits at t score x_{t+1}; draft
logits at (t, j) score x_{t+2+j} (offset j + 1). `loss_mask_bt[t]` says whether
token x_t counts as a target (0 for pads and pauses), so masking a pause in
the data masks it for the main model and every draft offset at once. Rows that
pack several windows end to end carry `segments_bt` (window ids, 0 for padding):
a position is then scored only against targets of its own window.

The drafter is scored one offset at a time (`Drafts`: hidden states and their
head): a `lax.scan` over the K offsets whose body is a `jax.checkpoint`, so the
forward and the backward pass each hold one offset's (B, T, U) logits, never
(B, T, K, U). Full (B, T, K, V) draft logits are accepted too (`Drafts.from_logits`).
With a trimmed draft vocabulary, targets outside it are left out of the drafter's
loss (`draft_coverage`: the share of draft targets inside it) and the
distillation teacher is the main model's distribution restricted to it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtp.model.system import Drafts, shifted


def offset_weights(k: int, decay: float) -> jax.Array:
    """Geometric per-offset weights (1, decay, decay^2, ...) normalised to sum to 1."""
    w_k = decay ** jnp.arange(k, dtype=jnp.float32)
    return w_k / w_k.sum()


def _masked_mean(x, mask):
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _targets(tokens_bt, mask_bt, k: int, start: int, segments_bt=None):
    """Targets (B, T, k) = tokens shifted by start + j, and their masks (0 past the end, and
    with `segments_bt` (B, T) 0 where the target lies in another segment than t)."""
    tgt = shifted(tokens_bt, k, 0, start=start)
    m = shifted(mask_bt.astype(jnp.float32), k, 0, start=start)
    if segments_bt is not None:
        m = m * (shifted(segments_bt, k, -1, start=start) == segments_bt[..., None])
    return tgt, m


def _as_drafts(draft) -> Drafts:
    return draft if isinstance(draft, Drafts) else Drafts.from_logits(draft)


def _pick(drafts: Drafts, z_xu):
    """The drafter's top-1 full-vocabulary token (...) from its logits (..., U)."""
    pick_x = z_xu.argmax(-1)
    return pick_x if drafts.ids_u is None else drafts.ids_u[pick_x]


def supervised_terms(
    logits_btv,
    draft,
    tokens_bt,
    mask_bt,
    *,
    draft_weights_k,
    draft_weight: float = 1.0,
    distill_weight: float = 0.0,
    teacher_btu=None,
    segments_bt=None,
):
    """`supervised_loss` plus the drafter's top-1 tokens pred_btk (B, T, k), full ids: returns
    (loss, metrics, pred_btk); `draft` is a `Drafts` or draft logits (B, T, k, V).
    `logits_btv` None: the drafter alone (a frozen main model's cached taps), no main loss;
    `teacher_btu` (B, T, U) then gives the main model's logits over the draft vocabulary for
    distillation (`MTPSystem.main_logits_from_taps`); `segments_bt` (B, T): packed rows'
    window ids (module docstring)."""
    drafts = _as_drafts(draft)
    k, t = drafts.k, tokens_bt.shape[1]
    if logits_btv is None:
        if distill_weight and teacher_btu is None:
            raise ValueError("distillation needs the main model's logits or teacher_btu")
        main_loss = jnp.zeros((), jnp.float32)
    else:
        main_tgt_bt, main_m_bt = (
            a[..., 0] for a in _targets(tokens_bt, mask_bt, 1, 1, segments_bt)
        )
        main_ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, main_tgt_bt)
        main_loss = _masked_mean(main_ce_bt, main_m_bt)

    tgt_btk, m_btk = _targets(tokens_bt, mask_bt, k, 2, segments_bt)
    idx_btk, covered_btk = drafts.local(tgt_btk)
    m_in_btk = m_btk * covered_btk
    teacher_bsu = None
    if distill_weight:  # the main model's distribution for x_{t+2+j} sits at t + 1 + j
        if teacher_btu is None:
            teacher_btu = logits_btv if drafts.ids_u is None else logits_btv[..., drafts.ids_u]
        teacher_btu = jax.lax.stop_gradient(teacher_btu)
        b, _, u = teacher_btu.shape
        pad_bsu = jnp.zeros((b, k + 1, u), teacher_btu.dtype)
        teacher_bsu = jax.nn.log_softmax(jnp.concatenate([teacher_btu, pad_bsu], 1))

    @jax.checkpoint
    def offset(_, xs):
        """Offset j's masked mean CE (and KL to the teacher) and its top-1 tokens (B, T)."""
        h_btd, j, idx_bt, m_bt = xs
        z_btu = drafts.logits(h_btd)
        out = {
            "ce": _masked_mean(optax.softmax_cross_entropy_with_integer_labels(z_btu, idx_bt), m_bt)
        }
        if teacher_bsu is not None:
            logp_btu = jax.lax.dynamic_slice_in_dim(teacher_bsu, 1 + j, t, axis=1)
            kl_bt = (jnp.exp(logp_btu) * (logp_btu - jax.nn.log_softmax(z_btu))).sum(-1)
            out["kl"] = _masked_mean(kl_bt, m_bt)
        return None, (out, _pick(drafts, z_btu))

    _, (per_k, pred_kbt) = jax.lax.scan(offset, None, drafts.per_offset(idx_btk, m_in_btk))
    draft_loss = (per_k["ce"] * draft_weights_k).sum()
    loss = main_loss + draft_weight * draft_loss

    metrics = {
        "loss/main": main_loss,
        "loss/draft": draft_loss,
        "draft_coverage": _masked_mean(covered_btk.astype(jnp.float32), m_btk),
    }
    if distill_weight:
        distill = (per_k["kl"] * draft_weights_k).sum()
        loss = loss + distill_weight * distill
        metrics["loss/distill"] = distill
    metrics["loss"] = loss
    return loss, metrics, jnp.moveaxis(pred_kbt, 0, 2)


def supervised_loss(logits_btv, draft, tokens_bt, mask_bt, **weights):
    """Main CE + weighted drafter CE (+ optional distillation). Returns (loss, metrics).

    `draft`: a `Drafts` (scored one offset at a time) or draft logits (B, T, k, V).
    `weights`: draft_weights_k (k,), draft_weight, distill_weight (`supervised_terms`).
    Distillation pulls the drafter at (t, j) towards the main model's own
    (stop-gradient) distribution for the same token, i.e. main logits at t+1+j:
    the drafter then learns what the main model would say, which is what
    speculative verification accepts.
    """
    loss, metrics, _ = supervised_terms(logits_btv, draft, tokens_bt, mask_bt, **weights)
    return loss, metrics


def accuracy_metrics(logits_btv, pred_btk, tokens_bt, mask_bt, segments_bt=None):
    """`draft_accuracy` from the drafter's top-1 full-vocabulary tokens pred_btk (B, T, k).
    `logits_btv` None (cached taps): the rows are the main model's own greedy text, so its
    choices are taken to be the data's tokens. `segments_bt`: as `supervised_terms`."""
    k = pred_btk.shape[2]
    main_tgt_bt, main_m_bt = (a[..., 0] for a in _targets(tokens_bt, mask_bt, 1, 1, segments_bt))
    main_pred_bt = main_tgt_bt if logits_btv is None else logits_btv.argmax(-1)
    tgt_btk, m_btk = _targets(tokens_bt, mask_bt, k, 2, segments_bt)
    main_next_btk = shifted(main_pred_bt, k, -1, start=1)  # main's choice for x_{t+2+j}
    agree_btk = (pred_btk == main_next_btk).astype(jnp.float32)
    full_bt = m_btk[..., -1]  # positions whose k targets all lie inside the sequence
    per_offset = jax.vmap(_masked_mean, in_axes=(2, 2))
    return {
        "acc/main": _masked_mean((main_pred_bt == main_tgt_bt).astype(jnp.float32), main_m_bt),
        "acc/draft": per_offset((pred_btk == tgt_btk).astype(jnp.float32), m_btk),
        "agree/draft": per_offset(agree_btk, m_btk),
        "accepted_len": _masked_mean(jnp.cumprod(agree_btk, axis=-1).sum(-1), full_bt),
    }


def draft_accuracy(logits_btv, draft, tokens_bt, mask_bt):
    """Top-1 accuracies and the accepted length that greedy verification implies.

    `draft`: a `Drafts` or draft logits (B, T, k, V). `acc/draft` (k,): drafts
    against the data. `agree/draft` (k,): drafts against the main model's own
    greedy choice for the same token (main argmax at t+1+j), which is what
    speculative verification accepts. `accepted_len`: expected drafts accepted
    per pass, sum_j P(drafts 1..j all agree), measured jointly (no independence
    assumption).
    """
    drafts = _as_drafts(draft)
    pick = lambda xs: _pick(drafts, drafts.logits(xs[0]))
    pred_btk = jnp.moveaxis(jax.lax.map(pick, drafts.per_offset()), 0, 2)
    return accuracy_metrics(logits_btv, pred_btk, tokens_bt, mask_bt)
