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

The pass pieces (per-mode advance, emit, the next main pass) live in
`passes.py`, the returned `DecodeResult` in `result.py`. `urgency_b` is
passed to every main pass (the pause-token urgency input).

Not yet: draft trees (several branches per offset verified at once with a
tree attention mask, Medusa / EAGLE-2 style): drafts are one chain.
"""

from __future__ import annotations

import collections
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import UserError
from mtp.data.tokenizer import EOS_ID, PAD_ID, THINK_CLOSE_ID, THINK_OPEN_ID
from mtp.decode.passes import (
    Carry,
    Plan,
    advance_plain,
    advance_speculative,
    at,
    forward,
    next_pass,
)
from mtp.decode.result import DecodeResult
from mtp.decode.sampling import Sampling

MODES = ("slow", "fast", "speculative", "think")
GREEDY = Sampling()

# Traces per ("prefill", batch, prompt width) and per (mode, k, batch); a test reads it.
TRACES: collections.Counter = collections.Counter()


class DecodeError(UserError, ValueError):
    """Bad decoding input (prompt, mode, k, limits); the message says what is allowed."""


def _prefill(graphdef, state, prompt_bp, plen_b, urgency_b):
    """Pass 0: the right-padded prompts in one forward -> cache, logits and taps at their ends."""
    TRACES[("prefill", *prompt_bp.shape)] += 1
    system = nnx.merge(graphdef, state)
    b = prompt_bp.shape[0]
    zeros_b = jnp.zeros((b,), jnp.int32)
    cache = system.main.init_cache(b)
    logits_bpv, taps_bpld, cache = forward(system, prompt_bp, zeros_b, cache, urgency_b)
    return cache, at(logits_bpv, plen_b - 1), at(taps_bpld, plen_b - 1)


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
    advance = advance_speculative if spec else advance_plain

    def body(c: Carry) -> Carry:
        c = advance(system, plan, c, max_new_b, budget_b)
        return next_pass(system, plan, c, urgency_b)  # after the last advance: not counted

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
