"""Decoding an answer with `<pause>` tokens: fixed M, a confidence rule, or learned.

One jitted call decodes a batch in slow mode (one main token per pass) with a
KV cache and a `lax.while_loop`, as `engine.py` does, and decides before each
answer token whether to spend another pass on a `<pause>` instead:

- `fixed`: M pauses are appended to the prompt (Goyal et al. 2023, "Think
  before you speak"); the answer follows in plain slow mode.
- `confidence` / `entropy`: after each pass, if the main model's top
  probability is below `threshold` (or its entropy, in nats, above it), feed a
  `<pause>` and look again; at most `cap` pauses in a row.
- `learned`: the model's own choice — a `<pause>` it samples (or, greedily,
  ranks first) is fed as a pause; at `cap` in a row the best other token is
  taken instead (`forced`, since the policy did not choose it). With
  `answer_temperature` apart from `temperature`, the pause decision is drawn
  at `temperature` (pause with the tempered probability of `<pause>`) and
  the answer token at `answer_temperature`; equal, this is one draw from the
  tempered distribution. RL samples decisions and keeps answers greedy.

Adaptive kinds pause before the first answer token only (where pause
fine-tuning puts pauses), unless `per_token`: then before every answer token.

Outputs at pause positions are discarded: a pause never reaches `answer`.
The pause and answer tokens in decision order are in `seq` (what an RL loss
scores). Passes are counted per row as pauses + answer tokens (a pause in the
prompt costs one position, as a pause decoded later costs one pass), so
tokens per pass is answer / (answer + pauses) = 1 / (1 + M) per token.
Urgency (`urgency_b`, in [0, 1]) is fed to every pass when the model has it.
Except in `learned`, `<pause>` is never chosen as an answer token.

`think` mode (`PauseDecoder.think`): the thought is decoded by the engine in
its `think` mode (fast inside the span, `mtp.decode.engine`) up to
`</think>`, then the answer with pauses as above.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import UserError
from mtp.data.tokenizer import EOS_ID, PAD_ID, PAUSE_ID, THINK_CLOSE_ID

POLICIES = ("fixed", "confidence", "entropy", "learned")


class PauseError(UserError, ValueError):
    """Bad pause-decoding input; the message says what is allowed."""


@dataclasses.dataclass(frozen=True)
class PausePolicy:
    """How many passes to spend before each answer token (see the module docstring)."""

    kind: str = "fixed"
    m: int = 0  # fixed: pauses appended to the prompt
    threshold: float = 0.9  # confidence: top probability; entropy: nats
    cap: int = 16  # adaptive kinds: most pauses in a row
    per_token: bool = False  # adaptive kinds: before every answer token, not just the first

    def __post_init__(self):
        if self.kind not in POLICIES:
            raise PauseError(f"pause policy {self.kind!r} is unknown; allowed: {POLICIES}")
        if self.m < 0 or self.cap < 0:
            raise PauseError(f"pause m and cap must be >= 0, got m={self.m}, cap={self.cap}")


@dataclasses.dataclass
class PauseResult:
    """answer (B, N): answer tokens, never a pause; seq (B, N): pauses and answer tokens in
    decision order, `forced` (B, N) where the cap overrode the policy's pause, `choice`
    (B, N) where the policy could pause (what RL trains); pauses (B,) include the M of a
    fixed policy; passes (B,) = pauses + answer tokens."""

    answer: np.ndarray
    lengths: np.ndarray
    seq: np.ndarray
    seq_lengths: np.ndarray
    forced: np.ndarray
    choice: np.ndarray
    pauses: np.ndarray
    passes: np.ndarray

    def row(self, b: int) -> np.ndarray:
        return self.answer[b, : self.lengths[b]]

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(self.row(b)) for b in range(len(self.lengths))]


def _choose(logits_bv, temperature, key):
    if temperature == 0:
        return jnp.argmax(logits_bv, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits_bv / temperature).astype(jnp.int32)


def _decode(
    graphdef, state, prompt_bp, plen_b, urgency_b, max_new_b, key, *, policy, temperature,
    answer_temperature,
):  # fmt: skip
    system = nnx.merge(graphdef, state)
    main = system.main
    b, w = prompt_bp.shape
    n = main.cfg.max_len
    rows = jnp.arange(b)
    cache = main.init_cache(b)
    pos_bw = jnp.broadcast_to(jnp.arange(w), (b, w))
    logits_bwv, _, cache = main(prompt_bp, pos_bw, cache, urgency_b=urgency_b)
    zeros_b = jnp.zeros((b,), jnp.int32)
    c = dict(
        cache=cache,
        logits=logits_bwv[rows, plen_b - 1],  # (B, V)
        pos=plen_b,  # where the next fed token goes
        run=zeros_b,  # pauses in a row before the current answer token
        seq=jnp.full((b, n), PAD_ID, jnp.int32),
        forced=jnp.zeros((b, n), bool),
        choice=jnp.zeros((b, n), bool),
        nseq=zeros_b,
        answer=jnp.full((b, n), PAD_ID, jnp.int32),
        nout=zeros_b,
        done=jnp.zeros((b,), bool),
        key=key,
    )

    def body(c):
        key, k1, k2 = jax.random.split(c["key"], 3)
        logits_bv = c["logits"].astype(jnp.float32)
        no_pause_bv = logits_bv.at[:, PAUSE_ID].set(-jnp.inf)
        logp_bv = jax.nn.log_softmax(no_pause_bv)
        top_b = jnp.exp(logp_bv.max(-1))
        ent_b = -jnp.sum(jnp.where(jnp.isfinite(logp_bv), jnp.exp(logp_bv) * logp_bv, 0.0), -1)
        can_b = c["run"] < policy.cap
        if not policy.per_token:
            can_b = can_b & (c["nout"] == 0)
        if policy.kind == "learned":
            if temperature == 0:
                want_b = jnp.argmax(logits_bv, -1) == PAUSE_ID
            else:
                p_pause_b = jax.nn.softmax(logits_bv / temperature)[:, PAUSE_ID]
                want_b = jax.random.uniform(k1, (b,)) < p_pause_b
            y_b = _choose(no_pause_bv, answer_temperature, k2)
        else:
            y_b = _choose(no_pause_bv, temperature, k1)
            if policy.kind == "confidence":
                want_b = top_b < policy.threshold
            elif policy.kind == "entropy":
                want_b = ent_b > policy.threshold
            else:
                want_b = jnp.zeros((b,), bool)
        running_b = ~c["done"]
        pause_b = want_b & can_b
        tok_b = jnp.where(pause_b, PAUSE_ID, y_b)
        seq_at = jnp.where(running_b, c["nseq"], n)  # n: dropped
        seq = c["seq"].at[rows, seq_at].set(tok_b, mode="drop")
        forced = c["forced"].at[rows, seq_at].set(want_b & ~can_b, mode="drop")
        choice = c["choice"].at[rows, seq_at].set(can_b, mode="drop")
        emit_b = running_b & ~pause_b
        out_at = jnp.where(emit_b, c["nout"], n)
        answer = c["answer"].at[rows, out_at].set(tok_b, mode="drop")
        nout_b = c["nout"] + emit_b
        done_b = c["done"] | (emit_b & ((tok_b == EOS_ID) | (nout_b >= max_new_b)))
        done_b = done_b | (c["pos"] >= n)  # the cache is full
        logits_b1v, _, cache = main(tok_b[:, None], c["pos"][:, None], c["cache"],
                                    urgency_b=urgency_b)  # fmt: skip
        return dict(
            cache=cache,
            logits=logits_b1v[:, 0],
            pos=c["pos"] + running_b,
            run=jnp.where(pause_b, c["run"] + 1, 0),
            seq=seq,
            forced=forced,
            choice=choice,
            nseq=c["nseq"] + running_b,
            answer=answer,
            nout=nout_b,
            done=done_b,
            key=key,
        )

    c = jax.lax.while_loop(lambda c: jnp.any(~c["done"]), body, c)
    return {k: c[k] for k in ("seq", "forced", "choice", "nseq", "answer", "nout")}


@functools.lru_cache(maxsize=16)
def _compiled(graphdef):
    return jax.jit(
        functools.partial(_decode, graphdef),
        static_argnames=("policy", "temperature", "answer_temperature"),
    )


class PauseDecoder:
    """Decodes answers with pauses for one system's weights; `set_weights` after an update.

    >>> dec = PauseDecoder(system)
    >>> res = dec.generate([head_ids], PausePolicy("confidence", threshold=0.9))
    >>> res.texts(ByteTokenizer()), res.passes
    """

    def __init__(self, system):
        self.graphdef, self.state = nnx.split(system)
        self._decode = _compiled(self.graphdef)
        self.max_len = system.main.cfg.max_len
        self.use_urgency = system.main.cfg.use_urgency

    def set_weights(self, system) -> None:
        _, self.state = nnx.split(system)
        self._thinker = None

    def think(
        self,
        prompts,
        policy: PausePolicy = PausePolicy(),
        *,
        think_tokens: int = 32,
        urgency_b=None,
        **kwargs,
    ) -> tuple[list[np.ndarray], PauseResult]:  # noqa: B008
        """Think mode: prompts end inside a thinking span (`<bos> P <think>`); the engine
        writes the thought (`think` mode, at most `think_tokens` tokens, `</think>` forced
        if it runs out), then the answer is decoded with pauses. Returns (thoughts, result);
        `result.passes` counts the answer's passes only."""
        from mtp.decode.engine import Decoder  # the engine imports nothing from here

        system = nnx.merge(self.graphdef, self.state)
        if getattr(self, "_thinker", None) is None:
            self._thinker = Decoder(system, eos_id=THINK_CLOSE_ID)
        res = self._thinker.generate(prompts, mode="think", max_new_tokens=think_tokens,
                                     urgency_b=urgency_b)  # fmt: skip
        thoughts, heads = [], []
        for b, p in enumerate(prompts):
            t = res.row(b)
            if t.size == 0 or t[-1] != THINK_CLOSE_ID:
                t = np.concatenate([t, [THINK_CLOSE_ID]]).astype(np.int32)
            thoughts.append(t)
            heads.append(np.concatenate([np.asarray(p, np.int32), t]))
        return thoughts, self.generate(heads, policy, urgency_b=urgency_b, **kwargs)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        policy: PausePolicy = PausePolicy(),  # noqa: B008 (frozen)
        *,
        max_new_tokens: int = 8,
        temperature: float = 0.0,
        answer_temperature: float | None = None,
        urgency_b=None,
        seed: int | jax.Array = 0,
    ) -> PauseResult:
        if len(prompts) == 0:
            raise PauseError("no prompts: pass at least one token sequence")
        m = policy.m if policy.kind == "fixed" else 0
        rows = [np.concatenate([np.asarray(p, np.int32), np.full(m, PAUSE_ID, np.int32)])
                for p in prompts]  # fmt: skip
        longest = max(r.size for r in rows)
        if min(r.size for r in rows) == m:
            raise PauseError("a prompt is empty; give at least one token (e.g. <bos>)")
        cap = policy.cap if policy.kind != "fixed" else 0  # adaptive pauses per answer token
        need = longest + max_new_tokens + cap * (max_new_tokens if policy.per_token else 1)
        if need > self.max_len:
            raise PauseError(
                f"prompt ({longest} tokens with pauses) + max_new_tokens={max_new_tokens} "
                f"(and up to cap={policy.cap} pauses "
                f"{'before each answer token' if policy.per_token else 'before the answer'}) "
                f"= {need} exceeds the cache "
                f"(max_len={self.max_len})"
            )
        b = len(rows)
        width = min(self.max_len, max(8, 1 << (longest - 1).bit_length()))
        prompt_bp = np.zeros((b, width), np.int32)
        for i, r in enumerate(rows):
            prompt_bp[i, : r.size] = r
        if urgency_b is not None:
            urgency_b = jnp.broadcast_to(jnp.asarray(urgency_b, jnp.float32), (b,))
        elif self.use_urgency:
            urgency_b = jnp.zeros((b,), jnp.float32)
        key = jax.random.key(seed) if isinstance(seed, int | np.integer) else seed
        out = jax.device_get(
            self._decode(
                self.state, jnp.asarray(prompt_bp), jnp.asarray([r.size for r in rows]),
                urgency_b, jnp.full((b,), max_new_tokens, jnp.int32), key,
                policy=policy, temperature=float(temperature),
                answer_temperature=float(
                    temperature if answer_temperature is None else answer_temperature
                ),
            )
        )  # fmt: skip
        nseq, nout = out["nseq"], out["nout"]
        pauses = nseq - nout + m
        return PauseResult(
            answer=out["answer"],
            lengths=nout,
            seq=out["seq"],
            seq_lengths=nseq,
            forced=out["forced"],
            choice=out["choice"],
            pauses=pauses,
            passes=pauses + nout,
        )
