"""Decoding engine: slow, fast, speculative and think modes in one jitted loop.

One call decodes a batch of prompts to the end in two compiled calls: a
prefill pass over the (right-padded) prompts, then a `lax.while_loop` of
main passes over a fixed-size KV cache until every row has stopped (EOS or
its token limit). No Python runs per token, nothing goes to the host until
the end, and nothing recompiles as the output grows: the output buffers are
`max_len` long and the token limit is a traced argument. The loop compiles
once per (architecture, mode, k, sampling settings, batch), the prefill once
per (architecture, batch, prompt width rounded up to a power of two); the
weights are a traced argument, so new weights of the same architecture (an
RL update, another checkpoint) reuse both.

A pass at position t emits the main token y_0 = x_{t+1} and lets the drafter
draft y_1..y_k after it. The modes differ in what they keep:

- `slow`: y_0 only; one token fed per pass; the drafter is not run.
- `fast`: y_0 and the k drafts, unverified; the next pass feeds all k + 1
  tokens at once, so every pass emits exactly k + 1 tokens.
- `speculative`: the drafts are verified by the next pass (`speculative.py`):
  greedy output equals `slow` greedy token for token, sampled output is
  distributed exactly as `slow` sampling (Leviathan et al. 2023).
- `think`: `fast` while a thinking span is open (opened by the prompt or by
  an emitted `<think>`, closed by `</think>`; drafts after a `</think>` are
  dropped), `slow` otherwise. A pass with no row thinking feeds one token.

Rows of a batch sit at their own positions; tokens written to the cache past
a row's position (rejected drafts, prompt padding) are overwritten before
anything reads them (see `mtp.model.transformer`), so rollback is free.

Every call returns a `DecodeResult`: the tokens and, per token, the main pass
that produced it and its offset in that pass (0: main token, j: draft j) —
what an RL loss needs to score passes — and statistics: main passes, tokens
per pass, the accepted-length histogram and per-offset acceptance rate
(speculative), wall time.

Hook for pause tokens (not implemented here): `urgency_b` is passed to every
main pass. Not yet: draft trees (several branches per offset verified at once
with a tree attention mask, Medusa / EAGLE-2 style) — drafts are one chain.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import UserError
from mtp.data.tokenizer import EOS_ID, PAD_ID, THINK_CLOSE_ID, THINK_OPEN_ID
from mtp.decode import drafting
from mtp.decode.sampling import Sampling, choose, log_probs
from mtp.decode.speculative import verify_greedy, verify_sampled

MODES = ("slow", "fast", "speculative", "think")
GREEDY = Sampling()

# Traces per ("prefill", batch, prompt width) and per (mode, k, batch); a test reads it.
TRACES: collections.Counter = collections.Counter()


class DecodeError(UserError, ValueError):
    """Bad decoding input (prompt, mode, k, limits); the message says what is allowed."""


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


def _at(x_bw, idx_b):
    """x[b, idx_b[b]] for x of shape (B, W, ...)."""
    idx = idx_b.reshape(idx_b.shape + (1,) * (x_bw.ndim - 1))
    return jnp.take_along_axis(x_bw, idx, axis=1)[:, 0]


def _forward(system, feed_bw, pos_b, cache, urgency_b):
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


def _advance_plain(system, plan, c: Carry, max_new_b, budget_b) -> Carry:
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


def _advance_speculative(system, plan, c: Carry, max_new_b, budget_b) -> Carry:
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
    new_bk, logq_bkv = _draft(system, plan, _at(c.taps_bwld, n_b), y0_b, kd)
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


def _next_pass(system, plan, c: Carry, urgency_b) -> Carry:
    """Runs the main model on the feed; keeps what the next advance reads."""

    def wide():
        logits_bwv, taps_bwld, cache = _forward(system, c.feed_bw, c.pos_b, c.cache, urgency_b)
        if plan.mode == "speculative":
            return logits_bwv, taps_bwld, cache
        last_b = c.nfeed_b - 1
        return _at(logits_bwv, last_b)[:, None], _at(taps_bwld, last_b)[:, None], cache

    def narrow():  # think mode with no row thinking: feed one token, as slow does
        return _forward(system, c.feed_bw[:, :1], c.pos_b, c.cache, urgency_b)

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


def _prefill(graphdef, state, prompt_bp, plen_b, urgency_b):
    """Pass 0: the right-padded prompts in one forward -> cache, logits and taps at their ends."""
    TRACES[("prefill", *prompt_bp.shape)] += 1
    system = nnx.merge(graphdef, state)
    b = prompt_bp.shape[0]
    zeros_b = jnp.zeros((b,), jnp.int32)
    cache = system.main.init_cache(b)
    logits_bpv, taps_bpld, cache = _forward(system, prompt_bp, zeros_b, cache, urgency_b)
    return cache, _at(logits_bpv, plen_b - 1), _at(taps_bpld, plen_b - 1)


def _loop(graphdef, state, cache, logits_bv, taps_bld, plen_b, thinking_b, max_new_b,
          budget_b, urgency_b, key, plan: Plan):  # fmt: skip
    """Main passes after the prefill until every row has stopped; returns outputs and stats."""
    b = logits_bv.shape[0]
    TRACES[(plan.mode, plan.k, b)] += 1
    system = nnx.merge(graphdef, state)
    k, s, n = plan.k, plan.sampling, system.main.cfg.max_len
    spec = plan.mode == "speculative"
    w = 1 if plan.mode == "slow" else k + 1
    w_out = w if spec else 1
    pad = lambda x: jnp.concatenate([x[:, None], jnp.zeros((b, w_out - 1, *x.shape[1:]))], 1)
    zeros_b = jnp.zeros((b,), jnp.int32)
    c = Carry(
        cache=cache,
        logits_bwv=pad(logits_bv),
        taps_bwld=pad(taps_bld),
        fresh_b=jnp.ones((b,), bool),
        feed_bw=jnp.full((b, w), -1 if spec else 0, jnp.int32),  # -1: never accepted
        nfeed_b=jnp.ones((b,), jnp.int32),
        pos_b=plen_b - 1,  # as if the last prompt token had been fed alone
        logq_bkv=jnp.zeros((b, k, logits_bv.shape[-1]) if spec and not s.greedy else (b, 1, 1)),
        thinking_b=thinking_b,
        think_passes_b=zeros_b,
        out_bn4=jnp.zeros((b, n, 4), jnp.int32).at[:, :, 0].set(PAD_ID),
        nout_b=zeros_b,
        done_b=jnp.zeros((b,), bool),
        passes_b=jnp.ones((b,), jnp.int32),
        hist_bk=jnp.zeros((b, k + 1), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        key=key,
    )
    advance = _advance_speculative if spec else _advance_plain

    def body(c: Carry) -> Carry:
        c = advance(system, plan, c, max_new_b, budget_b)
        return _next_pass(system, plan, c, urgency_b)  # after the last advance: not counted

    c = jax.lax.while_loop(lambda c: jnp.any(~c.done_b) & (c.step <= n), body, c)
    return dict(
        tokens=c.out_bn4[..., 0],
        pass_id=c.out_bn4[..., 1],
        offset=c.out_bn4[..., 2],
        forced=c.out_bn4[..., 3].astype(bool),
        lengths=c.nout_b,
        passes=c.passes_b,
        hist=c.hist_bk,
        steps=c.step + 1,
    )


@functools.lru_cache(maxsize=32)
def _compiled(graphdef):
    """The jitted prefill and loop for one architecture. The graphdef is bound here, once:
    as a static argument it would be hashed on every call (~10 ms for a small model)."""
    prefill = jax.jit(functools.partial(_prefill, graphdef))
    loop = jax.jit(functools.partial(_loop, graphdef), static_argnames=("plan",))
    return prefill, loop


@dataclasses.dataclass
class DecodeResult:
    """Output of one batched call. Arrays are numpy; N = the model's max_len.

    tokens (B, N): emitted tokens, PAD past `lengths`; pass_id (B, N): the main
    pass that produced each token (0 = prefill pass; an accepted draft belongs
    to the pass that drafted it); offset (B, N): 0 for a main token, j for a
    draft at offset j; forced (B, N): the engine, not the policy, chose the
    token (think mode's `</think>` at the pass budget; leave it out of
    log-probs); valid (B, N): j < lengths[b]. passes (B,): main passes each row
    ran; accept_hist (k + 1,): speculative verify passes that accepted n = 0..k
    drafts (zeros in other modes).
    """

    mode: str
    k: int
    tokens: np.ndarray
    pass_id: np.ndarray
    offset: np.ndarray
    lengths: np.ndarray
    passes: np.ndarray
    accept_hist: np.ndarray
    batch_passes: int  # loop iterations, prefill included (rows share them)
    wall_s: float
    compiled: bool  # this call traced and compiled a new decoder (wall_s includes it)
    forced: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.tokens.shape[1]) < self.lengths[:, None]

    def row(self, b: int) -> np.ndarray:
        return self.tokens[b, : self.lengths[b]]

    def texts(self, tokenizer, skip_special: bool = False) -> list[str]:
        return [tokenizer.decode(self.row(b), skip_special) for b in range(len(self.lengths))]

    @property
    def stats(self) -> dict:
        tokens, passes = int(self.lengths.sum()), int(self.passes.sum())
        verified = int(self.accept_hist.sum())
        out = dict(
            mode=self.mode,
            k=self.k,
            batch=len(self.lengths),
            tokens=tokens,
            main_passes=self.batch_passes,
            row_passes=passes,
            tokens_per_pass=tokens / max(passes, 1),
            wall_s=self.wall_s,
            tokens_per_s=tokens / self.wall_s if self.wall_s > 0 else float("nan"),
            compiled=self.compiled,
        )
        if self.mode == "think" and self.forced is not None:
            out["forced_closes"] = int((self.forced & self.valid).sum())
        if self.mode == "speculative":
            n_k = np.arange(self.k + 1)
            out["accept_hist"] = self.accept_hist.tolist()
            out["mean_accepted"] = float((n_k * self.accept_hist).sum() / max(verified, 1))
            # offset j accepted in a verify pass iff n >= j
            out["accept_rate"] = [
                float(self.accept_hist[j:].sum() / max(verified, 1)) for j in range(1, self.k + 1)
            ]
        return out


def _thinking(prompt) -> bool:
    """Does the prompt leave a thinking span open (a <think> after the last </think>)?"""
    opens, closes = (
        np.flatnonzero(prompt == THINK_OPEN_ID),
        np.flatnonzero(prompt == THINK_CLOSE_ID),
    )
    return bool(opens.size) and (not closes.size or opens[-1] > closes[-1])


def _prompt_width(longest: int, max_len: int) -> int:
    """Prompts are padded to a power of two (>= 8) so few widths ever compile."""
    return min(max_len, max(8, 1 << (longest - 1).bit_length()))


class Decoder:
    """Decodes batches of token prompts with one system's weights, in any mode.

    >>> dec = Decoder(system)
    >>> res = dec.generate([ids], mode="speculative", max_new_tokens=64)
    >>> res.texts(ByteTokenizer()), res.stats
    """

    def __init__(self, system, *, eos_id: int = EOS_ID):
        self.graphdef, self.state = nnx.split(system)
        self._prefill, self._loop = _compiled(self.graphdef)
        self.k = int(system.k)
        self.max_len = system.main.cfg.max_len
        self.vocab_size = system.main.cfg.vocab_size
        self.eos_id = eos_id

    def set_weights(self, system) -> None:
        """New weights of the same architecture; reuses every compiled decoder."""
        graphdef, self.state = nnx.split(system)
        if graphdef != self.graphdef:
            raise DecodeError("set_weights: the new system's architecture differs; make a Decoder")

    def _check(self, prompts, mode, max_new_tokens, k):
        if mode not in MODES:
            raise DecodeError(f"decode mode {mode!r} is unknown; allowed: {', '.join(MODES)}")
        if k is not None and int(k) != self.k:
            raise DecodeError(
                f"k={k} but this checkpoint's drafter drafts k={self.k}; omit k or pass k={self.k}"
            )
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompts) == 0:
            raise DecodeError("no prompts: pass a list of at least one token sequence")
        rows = [np.asarray(p, np.int64).reshape(-1) for p in prompts]
        for i, row in enumerate(rows):
            if row.size == 0:
                raise DecodeError(f"prompt {i} is empty; give at least one token (e.g. <bos>)")
            if row.min() < 0 or row.max() >= self.vocab_size:
                raise DecodeError(
                    f"prompt {i} has token ids outside 0..{self.vocab_size - 1} (the vocabulary)"
                )
            if row.size >= self.max_len:
                raise DecodeError(
                    f"prompt {i} has {row.size} tokens; the cache holds max_len={self.max_len}, "
                    f"so prompts may have at most {self.max_len - 1}"
                )
            if row.size + max_new_tokens > self.max_len:
                raise DecodeError(
                    f"prompt {i} ({row.size} tokens) + max_new_tokens={max_new_tokens} exceeds "
                    f"the cache (max_len={self.max_len}); allowed: max_new_tokens <= "
                    f"{self.max_len - row.size}"
                )
        return rows

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        *,
        mode: str = "slow",
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        k: int | None = None,
        seed: int | jax.Array = 0,
        urgency_b: jax.Array | None = None,
        think_budget: int | Sequence[int] | None = None,
    ) -> DecodeResult:
        """Decodes every prompt (a list of token-id sequences, ragged allowed).

        sampling: greedy by default; seed: an int or a jax PRNG key. k must be
        None or the system's k. urgency_b (B,) float: passed to every main
        pass (the pause-token hook; the model must have `use_urgency`).
        think_budget (think mode; an int or one per row): after that many
        passes that emitted thinking tokens, the row's next main token is a
        forced `</think>` (`DecodeResult.forced`) and it answers in slow mode.
        """
        rows = self._check(prompts, mode, max_new_tokens, k)
        b = len(rows)
        if think_budget is None:
            budget_b = np.full((b,), self.max_len + 1, np.int32)
        else:
            if mode != "think":
                raise DecodeError(f"think_budget applies to mode='think' only, not {mode!r}")
            budget_b = np.broadcast_to(np.asarray(think_budget), (b,)).astype(np.int32)
            if (budget_b < 0).any():
                raise DecodeError(f"think_budget must be >= 0 passes, got {think_budget!r}")
        plen = np.array([r.size for r in rows], np.int32)
        width = _prompt_width(int(plen.max()), self.max_len)
        # padding: any in-vocabulary id (its cache slots are overwritten before being read)
        prompt_bp = np.zeros((b, width), np.int32)
        for i, r in enumerate(rows):
            prompt_bp[i, : r.size] = r
        if urgency_b is not None:
            urgency_b = jnp.broadcast_to(jnp.asarray(urgency_b, jnp.float32), (b,))
        key = jax.random.key(seed) if isinstance(seed, int | np.integer) else seed
        plan = Plan(mode=mode, k=self.k, sampling=sampling, eos_id=self.eos_id)
        thinking_b = np.array([_thinking(r) for r in rows])
        traces = sum(TRACES.values())
        t0 = time.perf_counter()
        cache, logits_bv, taps_bld = self._prefill(
            self.state, jnp.asarray(prompt_bp), jnp.asarray(plen), urgency_b
        )
        out = self._loop(
            self.state,
            cache,
            logits_bv,
            taps_bld,
            jnp.asarray(plen),
            jnp.asarray(thinking_b),
            jnp.full((b,), max_new_tokens, jnp.int32),
            jnp.asarray(budget_b),
            urgency_b,
            key,
            plan=plan,
        )
        out = jax.device_get(out)  # the one host transfer; blocks until done
        wall = time.perf_counter() - t0
        return DecodeResult(
            mode=mode,
            k=self.k,
            tokens=out["tokens"],
            pass_id=out["pass_id"],
            offset=out["offset"],
            forced=out["forced"],
            lengths=out["lengths"],
            passes=out["passes"],
            accept_hist=out["hist"].sum(0),
            batch_passes=int(out["steps"]),
            wall_s=wall,
            compiled=sum(TRACES.values()) > traces,
        )


def generate(system, prompts, **kwargs) -> DecodeResult:
    """One-off `Decoder(system).generate(prompts, **kwargs)`."""
    return Decoder(system).generate(prompts, **kwargs)
