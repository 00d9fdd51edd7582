"""`speculative`: the drafts are verified by the next main pass; lossless.

Greedy output equals `slow` greedy token for token; sampled output is
distributed exactly as `slow` sampling (the rules of `mtp.decode.speculative`,
Leviathan et al. 2023). Each pass feeds [y0, d_1..d_K] and keeps the main
logits at all K + 1 places, so the next advance can verify the K drafts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.decode import speculative
from mtp.decode.modes.base import Carry, Ctx, Mode, at, draft, emit, split_keys
from mtp.decode.sampling import choose, log_probs


@dataclasses.dataclass(frozen=True)
class Speculative(Mode):
    name = "speculative"
    all_logits = True

    def width(self, k: int) -> int:
        return k + 1

    def init(self, b, k, v, sampling, thinking_b) -> dict:
        return {
            "fresh_b": jnp.ones((b,), bool),  # no drafts pending yet (the last pass: prefill)
            # processed drafter log-probs of the pending drafts (sampling only)
            "logq_bkv": jnp.zeros((b, k, v) if not sampling.greedy else (b, 1, 1)),
        }

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        """Verifies the pending drafts, emits the n accepted ones and the main token after them
        (correction or bonus), then drafts K more after that token."""
        s, k = ctx.sampling, ctx.k
        b = c.logits_bwv.shape[0]
        fresh_b, logq_bkv = c.extra["fresh_b"], c.extra["logq_bkv"]
        c, (kv, ky, kd) = split_keys(ctx, c, 3)
        drafts_bk = c.feed_bw[:, 1:]
        if s.greedy:  # after the prefill the pending "drafts" are -1: none accepted
            n_b, y0_b = speculative.verify_greedy(c.logits_bwv, drafts_bk)
        else:
            logp_bwv = log_probs(c.logits_bwv, s)
            n_b, y0_b = speculative.verify_sampled(logp_bwv, logq_bkv, drafts_bk, kv)
            # after the prefill nothing is pending: y0 is drawn from the prompt's next-token law
            n_b = jnp.where(fresh_b, 0, n_b)
            y0_b = jnp.where(fresh_b, choose(c.logits_bwv[:, 0], s, ky), y0_b)
        running_b = ~c.done_b
        verified_b = running_b & ~fresh_b
        c = c._replace(
            pos_b=c.pos_b + jnp.where(running_b, n_b + 1, 0),
            hist_bk=c.hist_bk + jax.nn.one_hot(n_b, k + 1, dtype=jnp.int32) * verified_b[:, None],
        )
        new_bk, new_logq_bkv = draft(ctx, at(c.taps_bwld, n_b), y0_b, kd)
        j_w = jnp.arange(k + 1)
        old_bw = jnp.concatenate([drafts_bk, jnp.zeros((b, 1), jnp.int32)], axis=1)
        acc_bw = j_w < n_b[:, None]
        tok_bw = jnp.where(acc_bw, old_bw, y0_b[:, None])
        pass_bw = jnp.where(acc_bw, c.step - 1, c.step)  # a draft belongs to the pass before
        off_bw = jnp.where(acc_bw, j_w + 1, 0)
        c = emit(ctx, c, tok_bw, n_b + 1, pass_bw, off_bw)
        return c._replace(
            feed_bw=jnp.concatenate([y0_b[:, None], new_bk], axis=1),
            nfeed_b=jnp.full((b,), k + 1, jnp.int32),
            extra={
                "fresh_b": jnp.zeros_like(fresh_b),
                "logq_bkv": logq_bkv if new_logq_bkv is None else new_logq_bkv,
            },
        )
