"""`think`: fast inside a thinking span, slow outside it.

A span is opened by the prompt or by an emitted `<think>` and closed by
`</think>`; drafts after a `</think>` are dropped. A pass with no row thinking
feeds one token, as slow does. With `adaptive` (an `Adaptive` mode) the thought
keeps only the drafts that mode keeps: adaptive thought, slow answer. A
thought within a budget of passes, then an answer, is `mtp.decode.thinking.think_then_answer`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.decode.modes.adaptive import Adaptive
from mtp.decode.modes.base import Carry, Ctx, Mode, draft_states, split_keys
from mtp.decode.modes.fast import pass_tokens
from mtp.decode.modes.slow import main_token


def think_keep(tok_bw, thinking_b, specials):
    """How many leading tokens of [y0, d_1..d_K] to keep (B,), and whether the span is open
    after them (B,): y0 always, d_j only while the span is open after the tokens before it."""
    keep_b = jnp.ones_like(thinking_b)
    cnt_b = jnp.zeros(tok_bw.shape[:1], jnp.int32)
    state_b = thinking_b
    for j in range(tok_bw.shape[1]):
        if j:
            keep_b = keep_b & state_b
        cnt_b += keep_b
        t_b = tok_bw[:, j]
        new_b = jnp.where(t_b == specials.think_open, True, state_b)
        new_b = jnp.where(t_b == specials.think_close, False, new_b)
        state_b = jnp.where(keep_b, new_b, state_b)
    return cnt_b, state_b


@dataclasses.dataclass(frozen=True)
class Think(Mode):
    name = "think"
    adaptive: Adaptive | None = None

    def width(self, k: int) -> int:
        return k + 1

    def init(self, b, k, v, sampling, thinking_b) -> dict:
        return {"thinking_b": thinking_b}

    def narrow(self, c: Carry):
        return jnp.all((c.nfeed_b == 1) | c.done_b)

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        s, b = ctx.specials, c.logits_bwv.shape[0]
        thinking_b = c.extra["thinking_b"]
        c, (ky, kd) = split_keys(ctx, c, 2)
        c, y0_b = main_token(ctx, c, ky)
        opens_b = (thinking_b | (y0_b == s.think_open)) & (y0_b != s.think_close)
        c, kk = (c, None) if self.adaptive is None else self.adaptive.decision_key(c)

        def drafted():
            drafts_bk, logits_bku, x_bkd = draft_states(ctx, c, c.taps_bwld[:, 0], y0_b, kd)
            if self.adaptive is None:
                return drafts_bk, jnp.full((b,), ctx.k, jnp.int32)
            return drafts_bk, self.adaptive.kept(ctx, drafts_bk, logits_bku, x_bkd, kk)

        drafts_bk, n_b = jax.lax.cond(  # run the drafter only when some row will keep drafts
            jnp.any(opens_b & ~c.done_b),
            drafted,
            lambda: (jnp.zeros((b, ctx.k), jnp.int32), jnp.zeros((b,), jnp.int32)),
        )
        tok_bw = jnp.concatenate([y0_b[:, None], drafts_bk], axis=1)
        cnt_b, thinking_b = think_keep(tok_bw, thinking_b, s)
        cnt_b = jnp.minimum(cnt_b, n_b + 1)
        c = pass_tokens(ctx, c, y0_b, drafts_bk, cnt_b)
        return c._replace(extra={"thinking_b": thinking_b})
