"""`slow`: one main token per pass; the drafter is not run (plain autoregressive decoding)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mtp.decode.modes.base import Carry, Ctx, Mode, emit, split_keys
from mtp.decode.sampling import choose


def main_token(ctx: Ctx, c: Carry, key):
    """y0 (B,): the main model's next token after the last pass, and the positions advanced."""
    c = c._replace(pos_b=c.pos_b + jnp.where(~c.done_b, c.nfeed_b, 0))
    return c, choose(c.logits_bwv[:, 0], ctx.sampling, key)


@dataclasses.dataclass(frozen=True)
class Slow(Mode):
    name = "slow"

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        c, (key, _) = split_keys(ctx, c, 2)  # two, as the drafting modes draw
        c, y0_b = main_token(ctx, c, key)
        pass_b1 = jnp.broadcast_to(c.step, (y0_b.shape[0], 1))
        c = emit(ctx, c, y0_b[:, None], jnp.ones_like(y0_b), pass_b1, 0 * pass_b1)
        return c._replace(feed_bw=y0_b[:, None], nfeed_b=jnp.ones_like(y0_b))
