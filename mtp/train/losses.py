"""Supervised losses: main next-token, drafter multi-token, distillation.

Conventions (see `mtp.model.system`): main logits at t score x_{t+1}; draft
logits at (t, j) score x_{t+2+j} (offset j + 1). `loss_mask_bt[t]` says whether
token x_t counts as a target (0 for pads and pauses), so masking a pause in
the data masks it for the main model and every draft offset at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtp.model.system import shifted


def offset_weights(k: int, decay: float) -> jax.Array:
    """Geometric per-offset weights (1, decay, decay^2, ...) normalised to sum to 1."""
    w_k = decay ** jnp.arange(k, dtype=jnp.float32)
    return w_k / w_k.sum()


def _masked_mean(x, mask):
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def _targets(tokens_bt, mask_bt, k: int, start: int):
    """Targets (B, T, k) = tokens shifted by start + j, and their masks (0 past the end)."""
    tgt = shifted(tokens_bt, k, 0, start=start)
    m = shifted(mask_bt.astype(jnp.float32), k, 0, start=start)
    return tgt, m


def supervised_loss(
    logits_btv,
    draft_btkv,
    tokens_bt,
    mask_bt,
    *,
    draft_weights_k,
    draft_weight: float = 1.0,
    distill_weight: float = 0.0,
):
    """Main CE + weighted drafter CE (+ optional distillation). Returns (loss, metrics).

    Distillation pulls the drafter at (t, j) towards the main model's own
    (stop-gradient) distribution for the same token, i.e. main logits at t+1+j:
    the drafter then learns what the main model would say, which is what
    speculative verification accepts.
    """
    k = draft_btkv.shape[2]
    main_tgt_bt, main_m_bt = (a[..., 0] for a in _targets(tokens_bt, mask_bt, 1, 1))
    main_ce_bt = optax.softmax_cross_entropy_with_integer_labels(logits_btv, main_tgt_bt)
    main_loss = _masked_mean(main_ce_bt, main_m_bt)

    tgt_btk, m_btk = _targets(tokens_bt, mask_bt, k, 2)
    ce_btk = optax.softmax_cross_entropy_with_integer_labels(draft_btkv, tgt_btk)
    per_offset_k = jax.vmap(_masked_mean, in_axes=(2, 2))(ce_btk, m_btk)
    draft_loss = (per_offset_k * draft_weights_k).sum()
    loss = main_loss + draft_weight * draft_loss

    metrics = {"loss/main": main_loss, "loss/draft": draft_loss}
    if distill_weight:
        b, t, v = logits_btv.shape
        teacher = jnp.concatenate([logits_btv, jnp.zeros((b, k + 1, v), logits_btv.dtype)], 1)
        teacher_btkv = jnp.stack([teacher[:, 1 + j : 1 + j + t] for j in range(k)], 2)
        logp_btkv = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_btkv))
        p_btkv = jnp.exp(logp_btkv)
        kl_btk = (p_btkv * (logp_btkv - jax.nn.log_softmax(draft_btkv))).sum(-1)
        distill = (jax.vmap(_masked_mean, in_axes=(2, 2))(kl_btk, m_btk) * draft_weights_k).sum()
        loss = loss + distill_weight * distill
        metrics["loss/distill"] = distill
    metrics["loss"] = loss
    return loss, metrics


def draft_accuracy(logits_btv, draft_btkv, tokens_bt, mask_bt):
    """Top-1 accuracies and the accepted length that greedy verification implies.

    `acc/draft` (k,): drafts against the data. `agree/draft` (k,): drafts
    against the main model's own greedy choice for the same token (main argmax
    at t+1+j), which is what speculative verification accepts.
    `accepted_len`: expected drafts accepted per pass, sum_j P(drafts 1..j all
    agree), measured jointly (no independence assumption).
    """
    k = draft_btkv.shape[2]
    main_tgt_bt, main_m_bt = (a[..., 0] for a in _targets(tokens_bt, mask_bt, 1, 1))
    main_pred_bt = logits_btv.argmax(-1)
    tgt_btk, m_btk = _targets(tokens_bt, mask_bt, k, 2)
    draft_pred_btk = draft_btkv.argmax(-1)
    main_next_btk = shifted(main_pred_bt, k, -1, start=1)  # main's choice for x_{t+2+j}
    agree_btk = (draft_pred_btk == main_next_btk).astype(jnp.float32)
    full_bt = m_btk[..., -1]  # positions whose k targets all lie inside the sequence
    per_offset = jax.vmap(_masked_mean, in_axes=(2, 2))
    return {
        "acc/main": _masked_mean((main_pred_bt == main_tgt_bt).astype(jnp.float32), main_m_bt),
        "acc/draft": per_offset((draft_pred_btk == tgt_btk).astype(jnp.float32), m_btk),
        "agree/draft": per_offset(agree_btk, m_btk),
        "accepted_len": _masked_mean(jnp.cumprod(agree_btk, axis=-1).sum(-1), full_bt),
    }
