"""What every decoding mode shares: the loop's carry, its context, and the pass pieces.

The engine (`mtp.decode.engine`) runs one `lax.while_loop` whose body asks the
mode to *advance* on the outputs of the last main pass (choose the main token
y0, verify or keep drafts, emit, set the next feed) and then runs the next main
pass on that feed. A mode is a frozen dataclass (hashable: the loop compiles
once per mode value) with:

- `width(k)`: W, the tokens fed per pass;
- `all_logits`: keep the main logits at every fed token (verification), not
  only at the last real one;
- `init(b, k, v, sampling, thinking_b)`: its own carry fields (a dict, `Carry.extra`;
  thinking_b (B,): the prompt leaves a thinking span open);
- `advance(ctx, c) -> c`;
- `tree(c)`: the draft tree the next pass feeds (`FedTree`), or None (a chain);
  `feeds_trees`: whether it ever does;
- `narrow(c)`: a traced bool, True when the next pass may feed one token only
  (think mode with no row thinking); None if never;
- `extra_positions(max_new)`: cache positions it may need besides the prompt
  and `max_new` emitted tokens (pauses); `prompt_pauses()`: pauses appended to
  every prompt;
- `for_batch(b)`: the mode that decodes a call of b rows (itself, or one that
  pays better at that batch size: `speculative` hands large batches to `slow`).

Everything here is traced inside the loop: shapes are static, rows masked,
nothing goes to the host. B rows, W fed per pass, O = the call's cache slots, K drafts, V vocab.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from mtp.data.tokenizer import Specials
from mtp.decode.sampling import Sampling, choose, log_probs
from mtp.model.drafter import Tables


class Carry(NamedTuple):
    """Loop state; the body advances on the last pass's outputs, then runs the next pass."""

    cache: tuple
    logits_bwv: jax.Array  # last pass: main logits at its last real fed token (W' = 1),
    taps_bwld: jax.Array  # or at every fed token when the mode keeps all (W' = W); taps too
    feed_bw: jax.Array  # tokens the next pass feeds, from position pos_b
    nfeed_b: jax.Array  # how many of them are real (the rest is overwritten later)
    pos_b: jax.Array  # logical position of feed_bw[:, 0]
    tokens_bo: jax.Array  # emitted tokens, pad after nout_b
    pass_bo: jax.Array  # the main pass each belongs to (0 = prefill)
    offset_bo: jax.Array  # 0 for a pass's main token, j for its draft j
    forced_bo: jax.Array  # the engine, not the policy, chose it (a </think> at the budget)
    choice_bo: jax.Array  # pause: the policy could have paused here; adaptive, sampled
    # decisions: the policy ended the pass after this token
    nout_b: jax.Array  # tokens emitted so far (pauses included)
    counted_b: jax.Array  # of them, those that count toward max_new (pauses do not)
    done_b: jax.Array
    passes_b: jax.Array  # main passes while the row was running
    hist_bk: jax.Array  # (B, K + 1): passes that accepted (speculative) or kept (adaptive) n drafts
    step: jax.Array  # index of the last main pass (0 = prefill)
    key: jax.Array
    extra: dict[str, Any]  # the mode's own fields
    # with `keep_taps`: (B, O, L, D) the main model's taps at each position fed so far
    kept_taps: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class Ctx:
    """What a mode reads besides the carry: the system and the call's settings."""

    system: Any
    k: int
    sampling: Sampling
    specials: Specials
    stop_id: int  # the row stops after emitting it (-1: never)
    max_new_b: jax.Array  # (B,) emitted tokens allowed, pauses excluded
    urgency_b: jax.Array | None = None  # (B,) the call's urgency input, if any
    tables: Tables | None = None  # the system's `tables()`, once per call (None: an own head)


@dataclasses.dataclass(frozen=True)
class Mode(abc.ABC):
    """Base of the modes: a one-token pass with no state of its own; each mode defines
    `advance`."""

    name = "base"
    all_logits = False
    extra_kind = "slots"  # what `extra_positions` counts, for error messages

    def width(self, k: int) -> int:
        return 1

    def init(self, b: int, k: int, v: int, sampling: Sampling, thinking_b) -> dict:
        return {}

    def tree(self, c: Carry):
        return None

    @property
    def feeds_trees(self) -> bool:
        """Do its passes feed draft trees (tokens off their positions' slots)?"""
        return False

    def narrow(self, c: Carry):
        return None

    def extra_positions(self, max_new: int) -> int:
        return 0

    def prompt_pauses(self) -> int:
        """Pauses appended to every prompt before the prefill."""
        return 0

    def for_batch(self, b: int) -> Mode:
        return self

    @abc.abstractmethod
    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        """The body's first half: act on the last pass's outputs, set the next feed."""


def at(x_bw, idx_b):
    """x[b, idx_b[b]] for x of shape (B, W, ...)."""
    idx = idx_b.reshape(idx_b.shape + (1,) * (x_bw.ndim - 1))
    return jnp.take_along_axis(x_bw, idx, axis=1)[:, 0]


def split_keys(ctx: Ctx, c: Carry, n: int):
    """The carry with a fresh key and n subkeys; greedy decoding draws nothing, so keeps its key
    (the unused key work would otherwise run on every pass)."""
    if ctx.sampling.greedy:
        return c, [c.key] * n
    key, *subkeys = jax.random.split(c.key, n + 1)
    return c._replace(key=key), subkeys


def root(c: Carry):
    """(B,) the position drafts start after: the one before `c.pos_b`, where the next pass
    feeds y0 (a mode drafts once it has advanced `pos_b`)."""
    return c.pos_b - 1


def draft_states(ctx: Ctx, c: Carry, taps_bld, y0_b, key):
    """Drafts (B, K) after y0, chosen by the call's sampling, with the drafter's logits
    (B, K, U) and the hidden states that scored them (B, K, d), from the taps taps_bld
    (B, L, D) at the `root`."""
    s = ctx.sampling
    if s.greedy:
        pick = lambda logits_bu, j: choose(logits_bu, s, key)
    else:
        keys = jax.random.split(key, ctx.k)
        pick = lambda logits_bu, j: choose(logits_bu, s, keys[j])
    return ctx.system.draft(taps_bld, y0_b, pick, c.cache, root(c), ctx.tables)


def draft(ctx: Ctx, c: Carry, taps_bld, y0_b, key):
    """Drafts (B, K) after y0 and, when sampling, the processed log-probs (B, K, V) they were
    drawn from: over the drafter's U tokens, -inf elsewhere (a trimmed draft vocabulary)."""
    drafts_bk, logits_bku, _ = draft_states(ctx, c, taps_bld, y0_b, key)
    s = ctx.sampling
    return drafts_bk, (None if s.greedy else ctx.system.full_vocab(log_probs(logits_bku, s)))


def emit(
    ctx: Ctx, c: Carry, tok_bw, cnt_b, pass_bw, off_bw, *, forced_bw=None, choice_bw=None,
    counts_bw=None,
) -> Carry:  # fmt: skip
    """Appends the first cnt_b of tok_bw to each running row; stops rows at the stop token or
    when the tokens that count (`counts_bw`, default all) reach max_new."""
    b, w = tok_bw.shape
    n = c.tokens_bo.shape[1]
    j_w = jnp.arange(w)
    cnt_b = jnp.where(c.done_b, 0, cnt_b)
    counts_bw = jnp.ones((b, w), bool) if counts_bw is None else counts_bw
    stop_bw = (tok_bw == ctx.stop_id) & (j_w < cnt_b[:, None])
    has_stop_b = jnp.any(stop_bw, axis=1)
    cnt_b = jnp.where(has_stop_b, jnp.argmax(stop_bw, axis=1) + 1, cnt_b)
    # the room left in counted tokens, as a count of leading entries of tok_bw
    counted_bw = jnp.cumsum(counts_bw & (j_w < cnt_b[:, None]), axis=1)
    room_b = ctx.max_new_b - c.counted_b
    fits_bw = (counted_bw <= room_b[:, None]) & (j_w < cnt_b[:, None])
    full_b = jnp.any(counted_bw >= room_b[:, None], axis=1) & (cnt_b > 0)
    cnt_b = jnp.minimum(cnt_b, jnp.sum(fits_bw, axis=1))
    idx_bw = jnp.where(j_w < cnt_b[:, None], c.nout_b[:, None] + j_w, n)  # n: dropped
    rows_b1 = jnp.arange(b)[:, None]
    put = lambda out_bo, new_bw: out_bo.at[rows_b1, idx_bw].set(
        new_bw.astype(out_bo.dtype), mode="drop"
    )
    zeros_bw = jnp.zeros((b, w), bool)
    kept_bw = j_w < cnt_b[:, None]
    return c._replace(
        tokens_bo=put(c.tokens_bo, tok_bw),
        pass_bo=put(c.pass_bo, pass_bw),
        offset_bo=put(c.offset_bo, off_bw),
        forced_bo=put(c.forced_bo, zeros_bw if forced_bw is None else forced_bw),
        choice_bo=put(c.choice_bo, zeros_bw if choice_bw is None else choice_bw),
        nout_b=c.nout_b + cnt_b,
        counted_b=c.counted_b + jnp.sum(counts_bw & kept_bw, axis=1),
        done_b=c.done_b | ((has_stop_b | full_b) & ~c.done_b),
    )
