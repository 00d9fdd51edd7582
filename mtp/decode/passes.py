"""One main pass of the decoding engine, per mode: the loop state and the body's pieces.

The engine's `lax.while_loop` body (`mtp.decode.engine`) *advances* on the
outputs of the last main pass (pick y0, verify pending drafts, draft k more,
emit) and then runs the next main pass on the tokens it chose to feed. All
functions here are traced inside that loop: shapes are static, rows are
masked, nothing goes to the host. B rows, W tokens fed per pass, N = max_len.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mtp.data.tokenizer import EOS_ID, THINK_CLOSE_ID, THINK_OPEN_ID
from mtp.decode import drafting
from mtp.decode.sampling import Sampling, choose, log_probs
from mtp.decode.speculative import verify_greedy, verify_sampled


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled decoder, besides the shapes."""

    mode: str
    k: int
    sampling: Sampling
    eos_id: int = EOS_ID


class Carry(NamedTuple):
    """Loop state. B rows, W tokens fed per pass (1 in slow mode, else k + 1), N = max_len.

    The loop body first *advances* on the outputs of the last main pass (picks
    y0, verifies, drafts, emits, sets the next feed), then runs the next main
    pass on that feed.
    """

    cache: tuple
    logits_bwv: jax.Array  # last pass: main logits at its last fed token (W' = 1), or at
    taps_bwld: jax.Array  # every fed token in speculative mode (W' = W); taps likewise
    fresh_b: jax.Array  # speculative: no drafts pending yet (the last pass was the prefill)
    feed_bw: jax.Array  # tokens the next pass feeds, from position pos_b
    nfeed_b: jax.Array  # how many of them are real (the rest is overwritten later)
    pos_b: jax.Array  # logical position of feed_bw[:, 0]
    logq_bkv: jax.Array  # processed drafter log-probs of the pending drafts (sampled spec.)
    thinking_b: jax.Array  # think mode: is a thinking span open
    think_passes_b: jax.Array  # think mode: passes that emitted thinking tokens (the budget)
    out_bn4: jax.Array  # per emitted token: (token, main pass it belongs to (0 = prefill),
    #                    offset: 0 for the pass's main token, j for its draft j,
    #                    1 if the engine forced it (a </think> at the budget), else 0)
    nout_b: jax.Array  # tokens emitted so far
    done_b: jax.Array
    passes_b: jax.Array  # main passes while the row was running
    hist_bk: jax.Array  # (B, k + 1): verify passes that accepted n drafts
    step: jax.Array  # index of the last main pass (0 = prefill)
    key: jax.Array


def at(x_bw, idx_b):
    """x[b, idx_b[b]] for x of shape (B, W, ...)."""
    idx = idx_b.reshape(idx_b.shape + (1,) * (x_bw.ndim - 1))
    return jnp.take_along_axis(x_bw, idx, axis=1)[:, 0]


def forward(system, feed_bw, pos_b, cache, urgency_b):
    pos_bw = pos_b[:, None] + jnp.arange(feed_bw.shape[1])
    logits_bwv, taps_bwld, cache = system.main(feed_bw, pos_bw, cache, urgency_b=urgency_b)
    return logits_bwv, system.taps_for_drafter(taps_bwld), cache


def _split(c: Carry, plan: Plan, n: int):
    """The carry with a fresh key and n subkeys; greedy decoding draws nothing, so keeps its key
    (the unused key work would otherwise run on every pass)."""
    if plan.sampling.greedy:
        return c, [c.key] * n
    key, *subkeys = jax.random.split(c.key, n + 1)
    return c._replace(key=key), subkeys


def _draft(system, plan, taps_bld, y0_b, key):
    """Drafts (B, k) after y0 and their processed log-probs (B, k, V) when sampling."""
    s = plan.sampling
    if s.greedy:
        pick = lambda logits_bv, j: choose(logits_bv, s, key)
    else:
        keys = jax.random.split(key, plan.k)
        pick = lambda logits_bv, j: choose(logits_bv, s, keys[j])
    drafts_bk, logits_bkv = drafting.draft(system.drafter, taps_bld, y0_b, pick)
    return drafts_bk, (None if s.greedy else log_probs(logits_bkv, s))


def _think_keep(tok_bw, thinking_b, plan):
    """Think mode: how many leading tokens of [y0, d1..dk] to keep, and the span after them.

    y0 is always kept; d_j only while the span is open after the tokens before it.
    """
    keep_b = jnp.ones_like(thinking_b)
    cnt_b = jnp.zeros(tok_bw.shape[:1], jnp.int32)
    state_b = thinking_b
    for j in range(tok_bw.shape[1]):
        if j:
            keep_b = keep_b & state_b
        cnt_b += keep_b
        t_b = tok_bw[:, j]
        new_b = jnp.where(t_b == THINK_OPEN_ID, True, state_b)
        new_b = jnp.where(t_b == THINK_CLOSE_ID, False, new_b)
        state_b = jnp.where(keep_b, new_b, state_b)
    return cnt_b, state_b


def _emit(c: Carry, tok_bw, cnt_b, pass_bw, off_bw, max_new_b, plan, forced_bw=None) -> Carry:
    """Appends the first cnt_b of tok_bw to each running row; stops rows at EOS or the limit."""
    b, w = tok_bw.shape
    n = c.out_bn4.shape[1]
    j_w = jnp.arange(w)
    cnt_b = jnp.where(c.done_b, 0, cnt_b)
    eos_bw = (tok_bw == plan.eos_id) & (j_w < cnt_b[:, None])
    has_eos_b = jnp.any(eos_bw, axis=1)
    cnt_b = jnp.where(has_eos_b, jnp.argmax(eos_bw, axis=1) + 1, cnt_b)
    room_b = max_new_b - c.nout_b
    full_b = cnt_b >= room_b
    cnt_b = jnp.minimum(cnt_b, room_b)
    idx_bw = jnp.where(j_w < cnt_b[:, None], c.nout_b[:, None] + j_w, n)  # n: dropped
    rows_b1 = jnp.arange(b)[:, None]
    forced_bw = jnp.zeros_like(tok_bw) if forced_bw is None else forced_bw
    new_bw4 = jnp.stack([tok_bw, pass_bw, off_bw, forced_bw], axis=-1).astype(jnp.int32)
    return c._replace(
        out_bn4=c.out_bn4.at[rows_b1, idx_bw].set(new_bw4, mode="drop"),
        nout_b=c.nout_b + cnt_b,
        done_b=c.done_b | ((has_eos_b | full_b) & ~c.done_b),
    )


def advance_plain(system, plan, c: Carry, max_new_b, budget_b) -> Carry:
    """slow / fast / think: pick y0 from the last pass, draft, emit, set the next feed.

    think: a row that has spent `budget_b` passes thinking gets a forced `</think>`
    as its next main token (flagged in the output), then answers in slow mode.
    """
    s, k = plan.sampling, plan.k
    b = c.logits_bwv.shape[0]
    c, (ky, kd) = _split(c, plan, 2)
    running_b = ~c.done_b
    c = c._replace(pos_b=c.pos_b + jnp.where(running_b, c.nfeed_b, 0))
    y0_b = choose(c.logits_bwv[:, 0], s, ky)
    if plan.mode == "slow":
        pass_b1 = jnp.broadcast_to(c.step, (b, 1))
        c = _emit(c, y0_b[:, None], jnp.ones_like(y0_b), pass_b1, 0 * pass_b1, max_new_b, plan)
        return c._replace(feed_bw=y0_b[:, None], nfeed_b=jnp.ones_like(y0_b))
    taps_bld = c.taps_bwld[:, 0]
    forced_b = jnp.zeros_like(running_b)
    if plan.mode == "think":
        forced_b = c.thinking_b & (c.think_passes_b >= budget_b)
        y0_b = jnp.where(forced_b, THINK_CLOSE_ID, y0_b)
    if plan.mode == "fast":
        drafts_bk, _ = _draft(system, plan, taps_bld, y0_b, kd)
    else:  # think: run the drafter only when some row will keep its drafts
        opens_b = (c.thinking_b | (y0_b == THINK_OPEN_ID)) & (y0_b != THINK_CLOSE_ID)
        drafts_bk = jax.lax.cond(
            jnp.any(opens_b & running_b),
            lambda: _draft(system, plan, taps_bld, y0_b, kd)[0],
            lambda: jnp.zeros((b, k), jnp.int32),
        )
        c = c._replace(think_passes_b=c.think_passes_b + (opens_b & running_b))
    tok_bw = jnp.concatenate([y0_b[:, None], drafts_bk], axis=1)  # (B, k + 1)
    if plan.mode == "fast":
        cnt_b, thinking_b = jnp.full((b,), k + 1, jnp.int32), c.thinking_b
    else:
        cnt_b, thinking_b = _think_keep(tok_bw, c.thinking_b, plan)
    off_bw = jnp.broadcast_to(jnp.arange(k + 1), (b, k + 1))
    pass_bw = jnp.broadcast_to(c.step, (b, k + 1))
    nout_b = c.nout_b
    forced_bw = jnp.concatenate([forced_b[:, None], jnp.zeros((b, k), bool)], axis=1)
    c = _emit(c, tok_bw, cnt_b, pass_bw, off_bw, max_new_b, plan, forced_bw)
    nfeed_b = jnp.maximum(c.nout_b - nout_b, 1)  # a stopped row's feed is never used
    return c._replace(feed_bw=tok_bw, nfeed_b=nfeed_b, thinking_b=thinking_b)


def advance_speculative(system, plan, c: Carry, max_new_b, budget_b) -> Carry:
    """Verifies the pending drafts against the last pass, emits the n accepted ones and the
    main token after them (correction or bonus), then drafts k more after that token."""
    s, k = plan.sampling, plan.k
    b = c.logits_bwv.shape[0]
    c, (kv, ky, kd) = _split(c, plan, 3)
    drafts_bk = c.feed_bw[:, 1:]
    if s.greedy:  # after the prefill the pending "drafts" are -1: none accepted, y0 = argmax
        n_b, y0_b = verify_greedy(c.logits_bwv, drafts_bk)
    else:
        n_b, y0_b = verify_sampled(log_probs(c.logits_bwv, s), c.logq_bkv, drafts_bk, kv)
        # after the prefill nothing is pending: y0 is drawn from the prompt's next-token law
        n_b = jnp.where(c.fresh_b, 0, n_b)
        y0_b = jnp.where(c.fresh_b, choose(c.logits_bwv[:, 0], s, ky), y0_b)
    running_b = ~c.done_b
    verified_b = running_b & ~c.fresh_b
    c = c._replace(
        pos_b=c.pos_b + jnp.where(running_b, n_b + 1, 0),
        hist_bk=c.hist_bk + jax.nn.one_hot(n_b, k + 1, dtype=jnp.int32) * verified_b[:, None],
    )
    new_bk, logq_bkv = _draft(system, plan, at(c.taps_bwld, n_b), y0_b, kd)
    j_w = jnp.arange(k + 1)
    old_bw = jnp.concatenate([drafts_bk, jnp.zeros((b, 1), jnp.int32)], axis=1)
    acc_bw = j_w < n_b[:, None]
    tok_bw = jnp.where(acc_bw, old_bw, y0_b[:, None])
    pass_bw = jnp.where(acc_bw, c.step - 1, c.step)  # a draft belongs to the pass before
    off_bw = jnp.where(acc_bw, j_w + 1, 0)
    c = _emit(c, tok_bw, n_b + 1, pass_bw, off_bw, max_new_b, plan)
    return c._replace(
        feed_bw=jnp.concatenate([y0_b[:, None], new_bk], axis=1),
        nfeed_b=jnp.full((b,), k + 1, jnp.int32),
        logq_bkv=c.logq_bkv if logq_bkv is None else logq_bkv,
    )


def next_pass(system, plan, c: Carry, urgency_b) -> Carry:
    """Runs the main model on the feed; keeps what the next advance reads."""

    def wide():
        logits_bwv, taps_bwld, cache = forward(system, c.feed_bw, c.pos_b, c.cache, urgency_b)
        if plan.mode == "speculative":
            return logits_bwv, taps_bwld, cache
        last_b = c.nfeed_b - 1
        return at(logits_bwv, last_b)[:, None], at(taps_bwld, last_b)[:, None], cache

    def narrow():  # think mode with no row thinking: feed one token, as slow does
        return forward(system, c.feed_bw[:, :1], c.pos_b, c.cache, urgency_b)

    if plan.mode == "think":
        logits_bwv, taps_bwld, cache = jax.lax.cond(
            jnp.all((c.nfeed_b == 1) | c.done_b), narrow, wide
        )
    else:
        logits_bwv, taps_bwld, cache = wide()
    running_b = ~c.done_b
    return c._replace(
        cache=cache,
        logits_bwv=logits_bwv,
        taps_bwld=taps_bwld,
        fresh_b=jnp.zeros_like(c.fresh_b),
        passes_b=c.passes_b + running_b,
        step=c.step + jnp.any(running_b),
    )
