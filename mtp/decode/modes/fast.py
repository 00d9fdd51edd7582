"""`fast`: the main token and k drafts per pass, unverified; the next pass feeds all k + 1.

`Fast(drafts=j)` keeps only the first j drafts of every pass (1 + j tokens per pass;
0: all k), the fixed-length baseline of the adaptive mode."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mtp.decode.modes.base import Carry, Ctx, Mode, draft, emit, split_keys
from mtp.decode.modes.slow import main_token


def pass_tokens(ctx: Ctx, c: Carry, y0_b, drafts_bk, cnt_b, forced_b=None) -> Carry:
    """Emits the first cnt_b of [y0, d_1..d_K] and feeds them to the next pass."""
    b, k = drafts_bk.shape
    tok_bw = jnp.concatenate([y0_b[:, None], drafts_bk], axis=1)  # (B, K + 1)
    off_bw = jnp.broadcast_to(jnp.arange(k + 1), (b, k + 1))
    pass_bw = jnp.broadcast_to(c.step, (b, k + 1))
    forced_bw = None
    if forced_b is not None:
        forced_bw = jnp.concatenate([forced_b[:, None], jnp.zeros((b, k), bool)], axis=1)
    nout_b = c.nout_b
    c = emit(ctx, c, tok_bw, cnt_b, pass_bw, off_bw, forced_bw=forced_bw)
    nfeed_b = jnp.maximum(c.nout_b - nout_b, 1)  # a stopped row's feed is never used
    return c._replace(feed_bw=tok_bw, nfeed_b=nfeed_b)


@dataclasses.dataclass(frozen=True)
class Fast(Mode):
    name = "fast"
    drafts: int = 0  # drafts kept per pass (0: all k)

    def width(self, k: int) -> int:
        return k + 1

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        c, (ky, kd) = split_keys(ctx, c, 2)
        c, y0_b = main_token(ctx, c, ky)
        drafts_bk, _ = draft(ctx, c, c.taps_bwld[:, 0], y0_b, kd)
        kept = min(self.drafts, ctx.k) if self.drafts else ctx.k
        cnt_b = jnp.full(y0_b.shape, kept + 1, jnp.int32)
        return pass_tokens(ctx, c, y0_b, drafts_bk, cnt_b)
