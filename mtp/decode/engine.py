"""The decoding engine: one jitted prefill and one `lax.while_loop`, whatever the mode.

One call decodes a batch of prompts to the end in two compiled calls: a prefill pass
over the (right-padded) prompts, then a `lax.while_loop` of main passes over a fixed-size
KV cache until every row has stopped (its stop token or its token limit). No Python runs
per token, nothing goes to the host until the end. The cache and the output buffers hold
the call's positions (`shapes.cache_slots`), not `max_len`: every pass's attention reads
every slot. The token limit is traced, so nothing recompiles as the output grows within
a size. The loop compiles once per (architecture, cache size, mode, k, sampling settings,
specials, batch), the prefill once per (architecture, cache size, batch, prompt width);
the weights are traced, so new weights of the same architecture (an RL update, another
checkpoint) reuse both.

A pass at position t emits the main token y_0 = x_{t+1} and may let the
drafter draft y_1..y_k after it. What a pass keeps is the mode's
(`mtp.decode.modes`): slow, fast, adaptive, speculative, think, pause. Rows of a batch
sit at their own positions; tokens written to the cache past a row's position
(rejected drafts, prompt padding) are overwritten before anything reads them
(see `mtp.model.transformer`), so rollback is free.

Every call returns a `DecodeResult`: the tokens and, per token, the main pass
that produced it and its offset in that pass (what an RL loss needs to score
passes), and statistics. `urgency_b` is passed to every main pass.
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

from mtp.data.tokenizer import Specials
from mtp.decode.modes import Mode, make_mode
from mtp.decode.modes.base import Carry, Ctx, at
from mtp.decode.result import DecodeResult
from mtp.decode.sampling import Sampling
from mtp.decode.shapes import cache_slots, prompt_width
from mtp.errors import DecodeError
from mtp.model.packed_products import available as packed_available
from mtp.model.packed_products import pack_all

GREEDY = Sampling()

# Traces per ("prefill", batch, prompt width, cache slots) and per (mode, k, batch, cache
# slots): what each compile was for; a test reads it.
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one compiled loop, besides the shapes."""

    mode: Mode
    k: int
    sampling: Sampling
    specials: Specials
    stop_id: int
    keep_taps: bool = False


def _prefill(graphdef, state, prompt_bt, plen_b, urgency_b, keep_taps=False):
    """Pass 0: the right-padded prompts in one forward -> cache, logits and taps at their ends,
    and with `keep_taps` the taps at every prompt position (B, W, L, D) (else None)."""
    system = nnx.merge(graphdef, state)
    TRACES[("prefill", *prompt_bt.shape, system.max_len)] += 1
    b = prompt_bt.shape[0]
    cache = system.init_cache(b)
    start_b = jnp.zeros((b,), jnp.int32)
    logits_b1v, taps_btld, cache = system.main_pass(
        prompt_bt, start_b, cache, urgency_b, logits_at_b=plen_b - 1, fresh=True
    )
    return cache, logits_b1v[:, 0], at(taps_btld, plen_b - 1), taps_btld if keep_taps else None


def _next_pass(system, mode: Mode, c: Carry, urgency_b, emitted_b) -> Carry:
    """Runs the main model on the feed; keeps what the next advance reads (and, with
    `keep_taps`, the taps of the real fed tokens of rows that were running at the last
    advance, `emitted_b` (B,): a row that just stopped feeds its last tokens once more)."""
    b, w = c.feed_bw.shape

    def wide():  # -> logits and taps for the advance, taps of every fed token (B, W, L, D)
        if mode.all_logits:
            out = system.main_pass(c.feed_bw, c.pos_b, c.cache, urgency_b, tree=mode.tree(c))
            return (*out, out[1])
        last_b = c.nfeed_b - 1
        logits_b1v, taps_bwld, cache = system.main_pass(
            c.feed_bw, c.pos_b, c.cache, urgency_b, logits_at_b=last_b
        )
        return logits_b1v, at(taps_bwld, last_b)[:, None], cache, taps_bwld

    def narrow():  # every running row feeds one token: a one-token pass
        feed_b1 = c.feed_bw[:, :1]
        logits_b1v, taps_b1ld, cache = system.main_pass(feed_b1, c.pos_b, c.cache, urgency_b)
        fed_bwld = jnp.pad(taps_b1ld, ((0, 0), (0, w - 1), (0, 0), (0, 0)))
        return logits_b1v, taps_b1ld, cache, fed_bwld

    one_b = mode.narrow(c)
    if one_b is not None and c.kept_taps is not None:  # rows that just stopped count too
        one_b = one_b & jnp.all((c.nfeed_b == 1) | ~emitted_b)
    if one_b is None or w == 1:
        logits_bwv, taps_bwld, cache, fed_bwld = wide()
    else:
        logits_bwv, taps_bwld, cache, fed_bwld = jax.lax.cond(one_b, narrow, wide)
    running_b = ~c.done_b
    kept = c.kept_taps
    if kept is not None:  # the real fed tokens sit at consecutive positions
        j_w = jnp.arange(w)
        real_bw = emitted_b[:, None] & (j_w < c.nfeed_b[:, None])
        pos_bw = jnp.where(real_bw, c.pos_b[:, None] + j_w, kept.shape[1])  # past it: dropped
        kept = kept.at[jnp.arange(b)[:, None], pos_bw].set(fed_bwld.astype(kept.dtype), mode="drop")
    return c._replace(
        cache=cache,
        logits_bwv=logits_bwv,
        taps_bwld=taps_bwld,
        passes_b=c.passes_b + running_b,
        step=c.step + jnp.any(running_b),
        kept_taps=kept,
    )


def _loop(graphdef, state, cache, logits_bv, taps_bld, prompt_taps, plen_b, thinking_b,
          max_new_b, max_passes_b, urgency_b, key, plan: Plan):  # fmt: skip
    """Main passes after the prefill until every row has stopped; returns outputs and stats
    (with `plan.keep_taps`, also the taps at every fed position, from the prefill's
    `prompt_taps` (B, W, L, D) on)."""
    b, v = logits_bv.shape
    mode, k = plan.mode, plan.k
    system = nnx.merge(graphdef, state)
    n = system.max_len
    TRACES[(mode.name, k, b, n)] += 1
    w = mode.width(k)
    w_out = w if mode.all_logits else 1
    pad = lambda x: jnp.concatenate(
        [x[:, None], jnp.zeros((b, w_out - 1, *x.shape[1:]), x.dtype)], 1
    )  # in the pass's dtype (bfloat16 taps stay bfloat16)
    zeros_b, zeros_bo = jnp.zeros((b,), jnp.int32), jnp.zeros((b, n), jnp.int32)
    c = Carry(
        cache=cache,
        logits_bwv=pad(logits_bv),
        taps_bwld=pad(taps_bld),
        feed_bw=jnp.full((b, w), -1 if mode.all_logits else 0, jnp.int32),  # -1: never accepted
        nfeed_b=jnp.ones((b,), jnp.int32),
        pos_b=plen_b - 1,  # as if the last prompt token had been fed alone
        tokens_bo=jnp.full((b, n), plan.specials.pad, jnp.int32),
        pass_bo=zeros_bo,
        offset_bo=zeros_bo,
        forced_bo=jnp.zeros((b, n), bool),
        choice_bo=jnp.zeros((b, n), bool),
        nout_b=zeros_b,
        counted_b=zeros_b,
        done_b=jnp.zeros((b,), bool),
        passes_b=jnp.ones((b,), jnp.int32),
        hist_bk=jnp.zeros((b, k + 1), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        key=key,
        extra=mode.init(b, k, v, plan.sampling, thinking_b),
    )
    if plan.keep_taps:
        kept = jnp.zeros((b, n, *taps_bld.shape[1:]), taps_bld.dtype)
        c = c._replace(kept_taps=kept.at[:, : prompt_taps.shape[1]].set(prompt_taps))
    ctx = Ctx(system, k, plan.sampling, plan.specials, plan.stop_id, max_new_b, urgency_b,
              system.tables())  # fmt: skip

    def body(c: Carry) -> Carry:
        emitted_b = ~c.done_b
        c = mode.advance(ctx, c)  # has emitted what passes_b passes give: stop at the limit
        c = c._replace(done_b=c.done_b | (c.passes_b >= max_passes_b))
        return _next_pass(system, mode, c, urgency_b, emitted_b)  # after the last: not counted

    c = jax.lax.while_loop(lambda c: jnp.any(~c.done_b) & (c.step <= n), body, c)
    return dict(
        taps=c.kept_taps,
        tokens=c.tokens_bo,
        pass_id=c.pass_bo,
        offset=c.offset_bo,
        forced=c.forced_bo,
        choice=c.choice_bo,
        lengths=c.nout_b,
        passes=c.passes_b,
        hist=c.hist_bk,
        steps=c.step + 1,
    )


def compiler_options() -> dict | None:
    """XLA options for the decoding jits. On CPU, region-based copy insertion: without it
    XLA copies every layer's KV cache in every pass of the loop (the cache is read, then
    updated in place, inside a `while`), which cost a third of a batch-1 pass on SmolLM2."""
    cpu = jax.default_backend() == "cpu"
    return {"xla_cpu_copy_insertion_use_region_analysis": True} if cpu else None


@functools.lru_cache(maxsize=32)
def _compiled(graphdef):
    """The jitted prefill and loop for one architecture. The graphdef is bound here, once:
    as a static argument it would be hashed on every call (~10 ms for a small model)."""
    opts = compiler_options()
    prefill = functools.partial(_prefill, graphdef)
    prefill = jax.jit(prefill, static_argnames=("keep_taps",), compiler_options=opts)
    loop = jax.jit(
        functools.partial(_loop, graphdef), static_argnames=("plan",), compiler_options=opts
    )
    return prefill, loop


def _thinking(prompt, specials: Specials) -> bool:
    """Does the prompt leave a thinking span open (a <think> after the last </think>)?"""
    opens = np.flatnonzero(prompt == specials.think_open)
    closes = np.flatnonzero(prompt == specials.think_close)
    return bool(opens.size) and (not closes.size or opens[-1] > closes[-1])


class Call(NamedTuple):
    """One `generate` call's arguments: the prefill's after the weights (prompts (B, W),
    lengths (B,), urgency), the loop's after the weights and the prefill's outputs, the
    static `Plan` (whose `keep_taps` the prefill takes too) and the cache's slots."""

    prefill_args: tuple
    loop_args: tuple
    plan: Plan
    slots: int


class Decoder:
    """Decodes batches of token prompts with one system's weights, in any mode.

    >>> dec = Decoder(system, tok.specials)
    >>> res = dec.generate([ids], mode="speculative", max_new_tokens=64)
    >>> res.texts(tok), res.stats
    """

    def __init__(self, system, specials: Specials, packed: bool | None = None):
        """packed: products on packed copies of the weights (default: where available)."""
        if packed and not packed_available():
            raise DecodeError("packed=True: packed products need one x86-64 CPU with AVX-512")
        self.packed = packed_available() if packed is None else packed
        self.graphdef, self.state = nnx.split(self._prepared(system))
        self._graphdefs = {system.max_len: self.graphdef}  # by cache slots
        self.k, self.max_len, self.vocab_size = int(system.k), system.max_len, system.vocab_size
        self.specials = specials

    def set_weights(self, system) -> None:
        """New weights of the same architecture; reuses every compiled decoder."""
        graphdef, self.state = nnx.split(self._prepared(system))
        if graphdef != self.graphdef:
            raise DecodeError("set_weights: the new system's architecture differs; make a Decoder")

    def _prepared(self, system):
        """With `packed`, a copy sharing the weights and holding packed copies, made once."""
        return pack_all(nnx.merge(*nnx.split(system))) if self.packed else system

    def jits(self, slots: int):
        """The jitted prefill and loop of this architecture with caches of `slots` slots."""
        if slots not in self._graphdefs:
            short = nnx.merge(self.graphdef, self.state).with_max_len(slots)
            self._graphdefs[slots] = nnx.split(short)[0]
        return _compiled(self._graphdefs[slots])

    def _rows(self, prompts, mode: Mode, max_new_tokens, k):
        """The checked prompts (pauses appended) and the mode's `extra_positions`."""
        if k is not None and int(k) != self.k:
            raise DecodeError(
                f"k={k} but this checkpoint's drafter drafts k={self.k}; omit k or pass k={self.k}"
            )
        if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
            raise DecodeError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if len(prompts) == 0:
            raise DecodeError("no prompts: pass a list of at least one token sequence")
        suffix = np.full(mode.prompt_pauses(), self.specials.pause, np.int64)
        extra = mode.extra_positions(max_new_tokens)
        rows = []
        for i, p in enumerate(prompts):
            row = np.asarray(p, np.int64).reshape(-1)
            if row.size == 0:
                raise DecodeError(f"prompt {i} is empty; give at least one token (e.g. <bos>)")
            if row.min() < 0 or row.max() >= self.vocab_size:
                raise DecodeError(
                    f"prompt {i} has token ids outside 0..{self.vocab_size - 1} (the vocabulary)"
                )
            row = np.concatenate([row, suffix])
            if row.size >= self.max_len:
                raise DecodeError(
                    f"prompt {i} has {row.size} tokens; the cache holds max_len={self.max_len}, "
                    f"so prompts may have at most {self.max_len - 1}"
                )
            if row.size + max_new_tokens + extra > self.max_len:
                what = f" + up to {extra} {mode.extra_kind} ({mode})" if extra else ""
                room = self.max_len - row.size  # the pauses may grow with max_new_tokens
                fits = [n for n in range(1, room + 1) if n + mode.extra_positions(n) <= room]
                raise DecodeError(
                    f"prompt {i} ({row.size} tokens) + max_new_tokens={max_new_tokens}{what} "
                    f"exceeds the cache (max_len={self.max_len}); allowed: max_new_tokens <= "
                    f"{max(fits, default=0)}"
                )
            rows.append(row)
        return rows, extra

    def prepare(
        self, prompts, *, mode: str | Mode = "slow", max_new_tokens: int = 64,
        sampling: Sampling = GREEDY, k: int | None = None, seed: int | jax.Array = 0,
        urgency_b=None, stop_id: int | None = None, max_passes: int = 0, keep_taps: bool = False,
    ) -> Call:  # fmt: skip
        """The checked, padded arguments of `generate`'s two compiled calls (`Call`)."""
        mode = make_mode(mode).for_batch(len(prompts))
        if keep_taps and mode.feeds_trees:
            raise DecodeError(f"keep_taps: not with draft trees ({mode}): use a chain or slow")
        rows, extra = self._rows(prompts, mode, max_new_tokens, k)
        b = len(rows)
        plen = np.array([r.size for r in rows], np.int32)
        slots = cache_slots(int(plen.max()) + max_new_tokens + extra, self.max_len)
        width = prompt_width(int(plen.max()), slots)
        # padding: any in-vocabulary id (its cache slots are overwritten before being read)
        prompt_bt = np.zeros((b, width), np.int32)
        for i, r in enumerate(rows):
            prompt_bt[i, : r.size] = r
        if urgency_b is not None:
            urgency_b = jnp.broadcast_to(jnp.asarray(urgency_b, jnp.float32), (b,))
        key = jax.random.key(seed) if isinstance(seed, int | np.integer) else seed
        stop_id = self.specials.eos if stop_id is None else int(stop_id)
        plan = Plan(mode, self.k, sampling, self.specials, stop_id, keep_taps)
        thinking_b = np.array([_thinking(r, self.specials) for r in rows])
        plen_b = jnp.asarray(plen)
        return Call(
            prefill_args=(jnp.asarray(prompt_bt), plen_b, urgency_b),
            loop_args=(
                plen_b, jnp.asarray(thinking_b), jnp.full((b,), max_new_tokens, jnp.int32),
                jnp.full((b,), max_passes if max_passes > 0 else slots + 1, jnp.int32),
                urgency_b, key,
            ),
            plan=plan,
            slots=slots,
        )  # fmt: skip

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | np.ndarray,
        *,
        mode: str | Mode = "slow",
        max_new_tokens: int = 64,
        sampling: Sampling = GREEDY,
        k: int | None = None,
        seed: int | jax.Array = 0,
        urgency_b=None,
        stop_id: int | None = None,
        max_passes: int = 0,
        keep_taps: bool = False,
    ) -> DecodeResult:
        """Decodes every prompt (a list of token-id sequences, ragged allowed).

        mode: a name of `mtp.decode.modes.MODES` or a mode object (e.g.
        `Pause("confidence", threshold=0.9)`), or the mode it hands this batch size to
        (`Mode.for_batch`; the result's `mode` names the one that ran); sampling: greedy by default;
        seed: an int or a jax PRNG key. k must be None or the system's k.
        urgency_b (B,) or a scalar: passed to every main pass (the model must
        have `use_urgency`). stop_id: a row stops after emitting it (default the
        tokenizer's eos; -1: never). max_passes: a row stops after emitting what that many
        main passes give, the prefill included (0: no limit). keep_taps: the result also
        holds the main model's taps at every position it fed (`DecodeResult.taps`: what a
        drafter trains on, without a second pass over the rows); not with draft trees.
        """
        call = self.prepare(
            prompts, mode=mode, max_new_tokens=max_new_tokens, sampling=sampling, k=k,
            seed=seed, urgency_b=urgency_b, stop_id=stop_id, max_passes=max_passes,
            keep_taps=keep_taps,
        )  # fmt: skip
        traces = sum(TRACES.values())
        t0 = time.perf_counter()
        prefill, loop = self.jits(call.slots)
        after_prefill = prefill(self.state, *call.prefill_args, keep_taps=call.plan.keep_taps)
        out = loop(self.state, *after_prefill, *call.loop_args, plan=call.plan)
        out = jax.device_get(out)  # the one host transfer; blocks until done
        wall = time.perf_counter() - t0
        mode, b = call.plan.mode, out["tokens"].shape[0]
        prompt_pauses = np.full((b,), mode.prompt_pauses(), np.int32)
        return DecodeResult(
            mode=mode.name,
            k=self.k,
            tokens=out["tokens"],
            pass_id=out["pass_id"],
            offset=out["offset"],
            forced=out["forced"],
            choice=out["choice"],
            lengths=out["lengths"],
            passes=out["passes"] + prompt_pauses,
            prompt_pauses=prompt_pauses,
            accept_hist=out["hist"].sum(0),
            batch_passes=int(out["steps"]),
            wall_s=wall,
            compiled=sum(TRACES.values()) > traces,
            pause_id=self.specials.pause,
            taps=out["taps"],
        )
