"""`adaptive`: fast mode that keeps a draft only while the drafter is confident.

Each pass emits the main token y0, then the drafts d_1..d_K in order while their
confidence stays at or above the threshold tau, and stops at the first below:
1 to 1 + K tokens per pass, no verification (ConfAdapt, Kirchenbauer et al.
2026). The next pass feeds the tokens kept. tau = 0 keeps every draft (fast
mode, token for token); tau > 1 keeps none (slow mode, token for token).

Confidence of draft j (`confidence`):
- 'prob': the drafter's probability of the drafted token (softmax of its logits);
- 'margin': the top-1 minus the top-2 probability of the drafter's law;
- 'learned': sigmoid of the keep head's logit (`drafter.emission`), read at the
  call's urgency. With `sample=True` each keep decision is drawn from that
  probability instead of thresholded (RL rollouts); the pass's last token then
  records that the policy chose to stop after it (`choice`), so the RL
  objective can score the stop decision.

With `tau_urgent` >= 0 the threshold follows the urgency input u of the call:
tau_b = (1 - u) tau + u tau_urgent. Every pass adds its count of kept drafts
to the histogram (`DecodeResult.accept_hist`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.config import ConfigError
from mtp.decode.modes.base import Carry, Ctx, Mode, draft_states, emit, split_keys
from mtp.decode.modes.slow import main_token

CONFIDENCES = ("prob", "margin", "learned")


def leading(keep_bk):
    """How many leading entries of each row are True (B,)."""
    return jnp.sum(jnp.cumprod(keep_bk.astype(jnp.int32), axis=1), axis=1)


@dataclasses.dataclass(frozen=True)
class Adaptive(Mode):
    name = "adaptive"
    tau: float = 0.9
    confidence: str = "prob"
    tau_urgent: float = -1.0  # < 0: the threshold ignores the urgency
    sample: bool = False  # 'learned': draw each keep decision instead of thresholding

    def __post_init__(self):
        if self.confidence not in CONFIDENCES:
            raise ConfigError(
                f"adaptive confidence {self.confidence!r} is unknown; allowed: {CONFIDENCES}"
            )
        if not self.tau >= 0:
            raise ConfigError(f"adaptive tau must be >= 0, got {self.tau}")
        if self.sample and self.confidence != "learned":
            raise ConfigError("adaptive sample=True needs confidence='learned' (the keep head)")

    def width(self, k: int) -> int:
        return k + 1

    def narrow(self, c: Carry):
        return jnp.all((c.nfeed_b == 1) | c.done_b)

    def confidences(self, ctx: Ctx, drafts_bk, logits_bku, x_bkd):
        """Confidence (B, K) of each draft, by `confidence`."""
        if self.confidence == "learned":
            if not ctx.system.emission:
                raise ConfigError(
                    "adaptive confidence 'learned' needs a drafter with a keep head "
                    "(drafter.emission=True)"
                )
            u_bk = (
                None
                if ctx.urgency_b is None
                else jnp.broadcast_to(ctx.urgency_b[:, None], drafts_bk.shape)
            )
            return jax.nn.sigmoid(ctx.system.keep_logits(x_bkd, u_bk))
        p_bku = jax.nn.softmax(logits_bku.astype(jnp.float32), axis=-1)
        if self.confidence == "margin":
            top_bk2 = jax.lax.top_k(p_bku, 2)[0]
            return top_bk2[..., 0] - top_bk2[..., 1]
        ids_u = ctx.system.ids()
        if ids_u is None:
            return jnp.take_along_axis(p_bku, drafts_bk[..., None], -1)[..., 0]
        return jnp.sum(p_bku * (ids_u == drafts_bk[..., None]), axis=-1)  # O(U), not O(V)

    def threshold(self, ctx: Ctx, b: int):
        """tau per row (B,), following the urgency when `tau_urgent` >= 0."""
        tau_b = jnp.full((b,), self.tau, jnp.float32)
        if self.tau_urgent < 0 or ctx.urgency_b is None:
            return tau_b
        return tau_b + ctx.urgency_b * (self.tau_urgent - self.tau)

    def decision_key(self, c: Carry):
        """The carry and a key for this pass's keep decisions (None unless they are drawn,
        which they are even when the tokens are greedy)."""
        if not self.sample:
            return c, None
        key, kk = jax.random.split(c.key)
        return c._replace(key=key), kk

    def kept(self, ctx: Ctx, drafts_bk, logits_bku, x_bkd, key):
        """Drafts kept per row (B,): the leading ones at or above the threshold (or drawn)."""
        conf_bk = self.confidences(ctx, drafts_bk, logits_bku, x_bkd)
        if self.sample:
            keep_bk = jax.random.uniform(key, conf_bk.shape) < conf_bk
        else:
            keep_bk = conf_bk >= self.threshold(ctx, conf_bk.shape[0])[:, None]
        return leading(keep_bk)

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        k = ctx.k
        c, (ky, kd) = split_keys(ctx, c, 2)
        c, kk = self.decision_key(c)
        c, y0_b = main_token(ctx, c, ky)
        b = y0_b.shape[0]
        drafts_bk, logits_bku, x_bkd = draft_states(ctx, c, c.taps_bwld[:, 0], y0_b, kd)
        n_b = self.kept(ctx, drafts_bk, logits_bku, x_bkd, kk)
        tok_bw = jnp.concatenate([y0_b[:, None], drafts_bk], axis=1)  # (B, K + 1)
        j_w = jnp.arange(k + 1)
        stop_bw = self.sample & (j_w == n_b[:, None]) & (n_b[:, None] < k)
        running_b = ~c.done_b
        c = c._replace(
            hist_bk=c.hist_bk + jax.nn.one_hot(n_b, k + 1, dtype=jnp.int32) * running_b[:, None]
        )
        nout_b = c.nout_b
        c = emit(
            ctx, c, tok_bw, n_b + 1, jnp.broadcast_to(c.step, (b, k + 1)),
            jnp.broadcast_to(j_w, (b, k + 1)), choice_bw=stop_bw,
        )  # fmt: skip
        return c._replace(feed_bw=tok_bw, nfeed_b=jnp.maximum(c.nout_b - nout_b, 1))
