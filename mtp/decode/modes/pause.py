"""`pause`: slow decoding that may spend a pass on a `<pause>` before an answer token.

The policy (Goyal et al. 2023, "Think before you speak", for the fixed kind):

- `fixed`: M pauses are appended to the prompt; the answer follows in slow mode.
- `confidence` / `entropy`: after each pass, if the main model's top
  probability is below `threshold` (or its entropy, in nats, above it), feed a
  `<pause>` and look again; at most `cap` pauses in a row.
- `learned`: the model's own choice: a `<pause>` it samples at the decision
  `temperature` (greedily: ranks first) is fed as a pause; at `cap` in a row the
  best other token is taken instead (`forced`: the policy did not choose it).
  The answer token itself is drawn with the call's sampling settings, so RL can
  sample decisions and keep answers greedy.

Adaptive kinds pause before the first answer token only, unless `per_token`:
then before every answer token. A `<pause>` is never chosen as an answer token.
Pauses are emitted (the result's tokens hold pauses and answer in decision
order, `choice` marks where the policy could pause: what RL scores) but do not
count toward `max_new_tokens`; `DecodeResult.answer_row` drops them. Passes
per row are pauses + answer tokens, a pause in the prompt counting as one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.decode.modes.base import Carry, Ctx, Mode, emit, split_keys
from mtp.decode.sampling import choose
from mtp.errors import DecodeError

POLICIES = ("fixed", "confidence", "entropy", "learned")


@dataclasses.dataclass(frozen=True)
class Pause(Mode):
    """How many passes to spend before each answer token (see the module docstring)."""

    kind: str = "fixed"
    m: int = 0  # fixed: pauses appended to the prompt
    threshold: float = 0.9  # confidence: top probability; entropy: nats
    cap: int = 16  # adaptive kinds: most pauses in a row
    per_token: bool = False  # adaptive kinds: before every answer token, not just the first
    temperature: float = 0.0  # learned: the decision's temperature (0: greedy)

    name = "pause"
    extra_kind = "pauses"

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise DecodeError(f"pause policy {self.kind!r} is unknown; allowed: {POLICIES}")
        if self.m < 0 or self.cap < 0:
            raise DecodeError(f"pause m and cap must be >= 0, got m={self.m}, cap={self.cap}")
        if self.temperature < 0:
            raise DecodeError(f"pause temperature must be >= 0, got {self.temperature}")

    def prompt_pauses(self) -> int:
        return self.m if self.kind == "fixed" else 0

    def extra_positions(self, max_new: int) -> int:
        if self.kind == "fixed":
            return 0
        return self.cap * (max_new if self.per_token else 1)

    def init(self, b, k, v, sampling, thinking_b) -> dict:
        return {"run_b": jnp.zeros((b,), jnp.int32)}  # pauses in a row before this token

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        pause_id = ctx.specials.pause
        b = c.logits_bwv.shape[0]
        run_b = c.extra["run_b"]
        c, (k1, k2) = split_keys(ctx, c, 2)
        running_b = ~c.done_b
        c = c._replace(pos_b=c.pos_b + jnp.where(running_b, c.nfeed_b, 0))
        logits_bv = c.logits_bwv[:, 0].astype(jnp.float32)
        no_pause_bv = logits_bv.at[:, pause_id].set(-jnp.inf)
        y_b = choose(no_pause_bv, ctx.sampling, k2)
        if self.kind == "learned":
            if self.temperature == 0:
                want_b = jnp.argmax(logits_bv, -1) == pause_id
            else:
                p_pause_b = jax.nn.softmax(logits_bv / self.temperature)[:, pause_id]
                want_b = jax.random.uniform(k1, (b,)) < p_pause_b
        elif self.kind == "fixed":
            want_b = jnp.zeros((b,), bool)
        else:
            logp_bv = jax.nn.log_softmax(no_pause_bv)
            if self.kind == "confidence":
                want_b = jnp.exp(logp_bv.max(-1)) < self.threshold
            else:
                p_bv = jnp.where(jnp.isfinite(logp_bv), jnp.exp(logp_bv) * logp_bv, 0.0)
                want_b = -jnp.sum(p_bv, -1) > self.threshold
        can_b = run_b < self.cap
        if not self.per_token:
            can_b = can_b & (c.counted_b == 0)
        pause_b = want_b & can_b
        tok_b1 = jnp.where(pause_b, pause_id, y_b)[:, None]
        pass_b1 = jnp.broadcast_to(c.step, (b, 1))
        c = emit(
            ctx, c, tok_b1, jnp.ones((b,), jnp.int32), pass_b1, 0 * pass_b1,
            forced_bw=(want_b & ~can_b)[:, None], choice_bw=can_b[:, None],
            counts_bw=~pause_b[:, None],
        )  # fmt: skip
        n = c.tokens_bo.shape[1]
        return c._replace(
            done_b=c.done_b | (c.pos_b >= n),  # the cache is full
            feed_bw=tok_b1,
            nfeed_b=jnp.ones((b,), jnp.int32),
            extra={"run_b": jnp.where(pause_b, run_b + 1, 0)},
        )
