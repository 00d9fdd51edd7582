"""Think-mode rollouts with the decoding engine, their rewards, and the RL batch.

A rollout of prompt P is `<bos> P <think>`, then a thought in `thought_mode`
('fast': 1 + k tokens per main pass, the drafts unverified; 'slow': one), then
`</think>`, then the answer in slow mode up to `<eos>`. It is decoded in two
engine calls so that the thought can have a budget of main passes:

1. the thought: mode `thought_mode`, stopping at `</think>` (the engine's stop
   token) or after `think_budget` passes (`budget * (k + 1)` tokens in fast
   mode); a thought cut by the budget gets a forced `</think>` that the
   policy did not sample (masked out of the loss);
2. the answer: mode `slow` from the prompt + thought, stopping at `<eos>`.

That is the engine's `think` mode with a pass budget (a pass whose drafts run
past `</think>` keeps only the tokens up to it, as `think` does). Main passes
are counted honestly: the thought call's passes (its prefill is the first
thought pass) plus one per answer token (the answer call's prefill is the
pass that emits the first answer token).

The reward of a rollout is the task's verifier score of the answer text minus
`pass_price` per main pass. A verifier that raises, or a non-finite score,
makes the rollout bad: `bad` is set and `errors` says why; the RL loop drops
the whole group (its baseline would be wrong) or stops, per `rl.on_bad_reward`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from mtp.data.task_data import encode_example
from mtp.data.tokenizer import EOS_ID, PAD_ID, THINK_CLOSE_ID, ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.decode.sampling import Sampling
from mtp.train.rl import token_stats

GREEDY = Sampling()


def prompt_ids(tok: ByteTokenizer, prompt: str) -> np.ndarray:
    """<bos> prompt <think>: what the model sees before it starts to think."""
    return encode_example(tok, prompt + "<think>")[:-1]  # drop the <eos>


@dataclasses.dataclass
class Rollouts:
    """B rollouts as teacher-forcing rows (see `mtp.train.rl` for the batch fields)."""

    tokens: np.ndarray  # (B, L) int32
    offset: np.ndarray  # (B, L) int32
    pass_: np.ndarray  # (B, L) int32: pass index within the row
    mask: np.ndarray  # (B, L) float32: 1 where the policy sampled the token
    prompts: list[str]
    answers: list[str]
    passes: np.ndarray  # (B,) main passes: thought + answer
    thought_passes: np.ndarray  # (B,)
    generated: np.ndarray  # (B,) tokens the policy emitted (thought + answer)
    forced_close: np.ndarray  # (B,) bool: the thought hit its budget
    scores: np.ndarray = None  # (B,) verifier scores (NaN where bad)
    rewards: np.ndarray = None  # (B,) score - price * passes (NaN where bad)
    bad: np.ndarray = None  # (B,) bool
    errors: list[str] = dataclasses.field(default_factory=list)

    def select(self, rows: np.ndarray) -> Rollouts:
        """The rollouts at `rows` (int indices), in that order."""
        pick = lambda x: x[rows] if isinstance(x, np.ndarray) else x
        out = {f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["prompts"] = [self.prompts[i] for i in rows]
        out["answers"] = [self.answers[i] for i in rows]
        return Rollouts(**out)

    def batch(self, adv_b: np.ndarray, keep_b: np.ndarray) -> dict:
        """The RL batch; rows not in `keep_b` are masked out entirely."""
        b, l = self.tokens.shape
        return dict(
            tokens=self.tokens,
            offset=self.offset,
            pass_=self.pass_,
            mask=self.mask * keep_b[:, None].astype(np.float32),
            adv=np.where(keep_b, adv_b, 0.0).astype(np.float32),
            old_lp=np.zeros((b, l), np.float32),
            ref_lp=np.zeros((b, l), np.float32),
        )

    def stats(self) -> dict:
        good = ~self.bad if self.bad is not None else np.ones(len(self.prompts), bool)
        n = max(int(good.sum()), 1)
        mean = lambda x: float(np.where(good, x, 0).sum() / n)
        return {
            "reward": mean(np.nan_to_num(self.rewards)) if self.rewards is not None else 0.0,
            "accuracy": mean(np.nan_to_num(self.scores)) if self.scores is not None else 0.0,
            "passes": float(self.passes.mean()),
            "thought_passes": float(self.thought_passes.mean()),
            "tokens_per_pass": float(self.generated.sum() / max(self.passes.sum(), 1)),
            "forced_close": float(self.forced_close.mean()),
            "bad_rollouts": float((~good).sum()),
        }


class ThinkRollout:
    """Decodes think-mode rollouts of one system; `set_weights` after each update."""

    def __init__(self, system, tok: ByteTokenizer | None = None):
        self.tok = tok or ByteTokenizer()
        self.thought = Decoder(system, eos_id=THINK_CLOSE_ID)
        self.answer = Decoder(system, eos_id=EOS_ID)
        self.k = self.thought.k
        self.max_len = self.thought.max_len
        self._agree = jax.jit(functools.partial(_agreement, self.thought.graphdef))

    def set_weights(self, system) -> None:
        self.thought.set_weights(system)
        self.answer.set_weights(system)

    def drafts_agree(self, ro: Rollouts) -> np.ndarray:
        """(B,) bool: every drafted token of the rollout is the main model's own greedy choice
        in its context (what speculative decoding would accept): where fast mode wrote exactly
        what slow mode would have. True for a rollout with no drafts."""
        agree_bl = np.asarray(self._agree(self.thought.state, ro.tokens, ro.offset))
        drafted_bl = (ro.mask > 0) & (ro.offset > 0)
        return (agree_bl | ~drafted_bl).all(1)

    def __call__(
        self,
        prompts: Sequence[str],
        *,
        thought_mode: str = "fast",
        think_budget: int = 0,
        answer_max_tokens: int = 16,
        sampling: Sampling = GREEDY,
        seed: int | jax.Array = 0,
    ) -> Rollouts:
        tok, k = self.tok, self.k
        heads = [prompt_ids(tok, p) for p in prompts]
        longest = max(h.size for h in heads)
        room = self.max_len - longest - answer_max_tokens - 1  # -1: a forced </think>
        if room < 1:
            raise ValueError(
                f"prompts of {longest} tokens + rl.answer_max_tokens={answer_max_tokens} leave no "
                f"room to think in model.max_len={self.max_len}; raise model.max_len"
            )
        per_pass = k + 1 if thought_mode == "fast" else 1
        limit = min(room, think_budget * per_pass) if think_budget else room
        key1, key2 = jax.random.split(jax.random.key(seed) if isinstance(seed, int) else seed)
        r1 = self.thought.generate(
            heads, mode=thought_mode, max_new_tokens=limit, sampling=sampling, seed=key1
        )
        thoughts, forced = [], np.zeros(len(heads), bool)
        for i in range(len(heads)):
            row = r1.row(i)
            forced[i] = row.size == 0 or row[-1] != THINK_CLOSE_ID
            thoughts.append(np.append(row, THINK_CLOSE_ID) if forced[i] else row)
        r2 = self.answer.generate(
            [np.concatenate([h, t]) for h, t in zip(heads, thoughts, strict=True)],
            mode="slow",
            max_new_tokens=answer_max_tokens,
            sampling=sampling,
            seed=key2,
        )
        return self._assemble(prompts, heads, thoughts, forced, r1, r2)

    def _assemble(self, prompts, heads, thoughts, forced, r1, r2) -> Rollouts:
        b = len(heads)
        lengths = [h.size + t.size + int(r2.lengths[i]) for i, (h, t) in
                   enumerate(zip(heads, thoughts, strict=True))]  # fmt: skip
        l = min(self.max_len, -(-max(lengths) // 32) * 32)  # few shapes: few compiles
        tokens = np.full((b, l), PAD_ID, np.int32)
        offset = np.zeros((b, l), np.int32)
        pass_ = np.zeros((b, l), np.int32)
        mask = np.zeros((b, l), np.float32)
        answers = []
        for i, (h, t) in enumerate(zip(heads, thoughts, strict=True)):
            n1, n2 = int(r1.lengths[i]), int(r2.lengths[i])
            p, a0 = h.size, h.size + t.size
            tokens[i, :p] = h
            tokens[i, p:a0] = t
            tokens[i, a0 : a0 + n2] = r2.tokens[i, :n2]
            offset[i, p : p + n1] = r1.offset[i, :n1]
            pass_[i, p : p + n1] = r1.pass_id[i, :n1]
            pass_[i, a0 : a0 + n2] = r1.passes[i] + r2.pass_id[i, :n2]
            mask[i, p : p + n1] = 1.0
            mask[i, a0 : a0 + n2] = 1.0
            ans = r2.tokens[i, :n2]
            ans = ans[: np.argmax(ans == EOS_ID)] if (ans == EOS_ID).any() else ans
            answers.append(self.tok.decode(ans, skip_special=True))
        return Rollouts(
            tokens=tokens,
            offset=offset,
            pass_=pass_,
            mask=mask,
            prompts=list(prompts),
            answers=answers,
            passes=(r1.passes + r2.passes).astype(np.int32),
            thought_passes=r1.passes.astype(np.int32),
            generated=(r1.lengths + r2.lengths).astype(np.int32),
            forced_close=forced,
        )


def _agreement(graphdef, state, tokens_bl, offset_bl):
    return token_stats(nnx.merge(graphdef, state), tokens_bl, offset_bl)[2]


def score_rollouts(
    ro: Rollouts,
    score: Callable[[str, str], float],
    pass_price: float = 0.0,
    credit: Callable[[str, str], float] | None = None,
) -> Rollouts:
    """Fills scores, rewards, bad and errors; never raises for a bad verifier result.

    The reward is `credit(prompt, answer)` (e.g. partial credit) if given, else the
    score, minus `pass_price` per main pass; `scores` stay the verifier's own.
    """
    b = len(ro.prompts)
    scores, credits = np.full(b, np.nan), np.full(b, np.nan)
    bad = np.zeros(b, bool)
    for i, (p, a) in enumerate(zip(ro.prompts, ro.answers, strict=True)):
        try:
            s = float(score(p, a))
            c = float(credit(p, a)) if credit else s
        except Exception as e:  # noqa: BLE001 - any verifier failure is reported, not fatal
            bad[i] = True
            ro.errors.append(
                f"verifier raised {type(e).__name__}: {e} (prompt {p!r}, answer {a!r})"
            )
            continue
        if not (math.isfinite(s) and math.isfinite(c)):
            bad[i] = True
            got = f"{s}" if credit is None else f"{s}, credit {c}"
            ro.errors.append(f"verifier returned {got} (prompt {p!r}, answer {a!r})")
            continue
        scores[i], credits[i] = s, c
    ro.scores = scores
    ro.rewards = credits - pass_price * ro.passes
    ro.bad = bad
    return ro
