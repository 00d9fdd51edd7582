"""Rollout kinds behind one protocol, their rewards, and the RL batch they make.

A rollout kind is called on the problems of a step (`Example`s, each repeated
`group_size` times in a row) and returns `Rollouts`: teacher-forcing rows with
the mask of what the policy chose, the answers, and each rollout's `cost`
(what `rl.pass_price` prices). It also names `token_logprob`, the log-prob of
the tokens where its policy chose something other than the token itself (None:
the token's own log-prob), and keeps its decoder's weights current
(`set_weights`). Kinds, by name in `ROLLOUTS`:

- `think`: `<bos> P <think>`, a thought in `rl.thought_mode` within
  `rl.think_budget` passes, `</think>`, an answer in slow mode
  (`mtp.decode.thinking`); cost: main passes. With `thought_mode='learned'`
  each pass keeps drafts by the keep head's sampled decisions (`stop` marks the
  tokens after which the policy ended a pass); with `rl.urgency` half the
  groups run at urgency 0, half at 1, and the cost is urgency x passes.
- `pause`: `<bos> P <think> thought </think>` with the worked thought given,
  then the answer with the `learned` pause policy: the model decides pass by
  pass whether to spend a `<pause>`, decisions sampled at `rl.temperature`,
  the answer greedy. Half the groups run at urgency 0, half at urgency 1 (the
  scalar the model embeds, `model.use_urgency`); cost: urgency x pauses, so a
  pause is free at urgency 0 and priced at urgency 1.

A verifier that raises, or a non-finite score, makes a rollout bad (`bad`,
`errors` says why); the learner drops its group or stops (`rl.on_bad_reward`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtp.config import RLConfig
from mtp.data.format import answer_text, encode_prompt
from mtp.data.tokenizer import Tokenizer
from mtp.decode.engine import Decoder
from mtp.decode.modes import Adaptive, Mode, Pause
from mtp.decode.sampling import Sampling
from mtp.decode.thinking import think_then_answer


@dataclasses.dataclass
class Rollouts:
    """B rollouts as teacher-forcing rows (see `mtp.rl.objectives` for the batch fields)."""

    tokens: np.ndarray  # (B, T) int32
    offset: np.ndarray  # (B, T) int32
    pass_: np.ndarray  # (B, T) int32: pass index within the row
    mask: np.ndarray  # (B, T) float32: 1 where the policy chose the token
    prompts: list[str]
    answers: list[str]
    passes: np.ndarray  # (B,) main passes: thought + answer
    thought_passes: np.ndarray  # (B,)
    generated: np.ndarray  # (B,) tokens the policy emitted (thought + answer)
    forced_close: np.ndarray  # (B,) bool: the thought hit its budget
    cost: np.ndarray  # (B,) what rl.pass_price prices
    urgency: np.ndarray | None = None  # (B,) the urgency input, if the kind sets one
    stop: np.ndarray | None = None  # (B, T) float32: the policy ended its pass after the token
    pauses: np.ndarray | None = None  # (B,) pauses spent, pause rollouts
    scores: np.ndarray = None  # (B,) verifier scores (NaN where bad)
    rewards: np.ndarray = None  # (B,) score - price * cost (NaN where bad)
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
        b, t = self.tokens.shape
        out = dict(
            tokens=self.tokens,
            offset=self.offset,
            pass_=self.pass_,
            mask=self.mask * keep_b[:, None].astype(np.float32),
            adv=np.where(keep_b, adv_b, 0.0).astype(np.float32),
            old_lp=np.zeros((b, t), np.float32),
            ref_lp=np.zeros((b, t), np.float32),
        )
        if self.urgency is not None:
            out["urgency"] = self.urgency.astype(np.float32)
        if self.stop is not None:
            out["stop"] = self.stop
        return out

    def stats(self) -> dict:
        good = ~self.bad if self.bad is not None else np.ones(len(self.prompts), bool)
        n = max(int(good.sum()), 1)
        mean = lambda x: float(np.where(good, x, 0).sum() / n)
        out = {
            "reward": mean(np.nan_to_num(self.rewards)) if self.rewards is not None else 0.0,
            "accuracy": mean(np.nan_to_num(self.scores)) if self.scores is not None else 0.0,
            "passes": float(self.passes.mean()),
            "thought_passes": float(self.thought_passes.mean()),
            "tokens_per_pass": float(self.generated.sum() / max(self.passes.sum(), 1)),
            "forced_close": float(self.forced_close.mean()),
            "bad_rollouts": float((~good).sum()),
        }
        if self.urgency is not None and self.pauses is None:
            for u in (0, 1):
                at_u = self.urgency == u
                if at_u.any():
                    out[f"passes_u{u}"] = float(self.passes[at_u].mean())
        if self.urgency is not None and self.pauses is not None:
            for u in (0, 1):
                at_u = self.urgency == u
                if at_u.any():
                    out[f"pauses_u{u}"] = float(self.pauses[at_u].mean())
                    if self.scores is not None:
                        out[f"accuracy_u{u}"] = float(np.nan_to_num(self.scores[at_u]).mean())
        return out


def _rows(prompt_ids, parts, offsets, passes, masks, length_multiple: int, pad: int, max_len: int):
    """Teacher-forcing rows: each head followed by its parts, with per-part offsets,
    pass indices and masks (numpy, (B, T), T rounded up so few shapes compile)."""
    lengths = [h.size + sum(p.size for p in ps) for h, ps in zip(prompt_ids, parts, strict=True)]
    t = min(max_len, -(-max(lengths) // length_multiple) * length_multiple)
    b = len(prompt_ids)
    tokens = np.full((b, t), pad, np.int32)
    offset, pass_ = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
    mask = np.zeros((b, t), np.float32)
    for i, h in enumerate(prompt_ids):
        tokens[i, : h.size] = h
        at = h.size
        for part, off, ps, m in zip(parts[i], offsets[i], passes[i], masks[i], strict=True):
            end = at + part.size
            tokens[i, at:end], offset[i, at:end], pass_[i, at:end] = part, off, ps
            mask[i, at:end] = m
            at = end
    return tokens, offset, pass_, mask


def thought_mode_of(name: str, sample: bool) -> str | Mode:
    """The decoding mode of `rl.thought_mode`: 'learned' is adaptive by the keep head, its
    decisions drawn (rollouts, `sample`) or thresholded at p(keep) = 0.5 (evaluation)."""
    if name == "learned":
        return Adaptive(tau=0.5, confidence="learned", sample=sample)
    return name


def group_urgency(b: int, group_size: int) -> np.ndarray:
    """(B,) urgency 0 for even groups, 1 for odd ones."""
    return ((np.arange(b) // group_size) % 2).astype(np.float32)


class ThinkRollout:
    """Think-mode rollouts of one system (module docstring); `set_weights` after each update."""

    name = "think"
    token_logprob = None

    def __init__(self, system, tok: Tokenizer, rl_config: RLConfig):
        self.tok, self.rl_config = tok, rl_config
        self.dec = Decoder(system, tok.specials)
        self.k = self.dec.k

    def set_weights(self, system) -> None:
        self.dec.set_weights(system)

    def __call__(
        self,
        problems: Sequence,
        *,
        group_size: int = 1,
        thought_mode: str | None = None,
        sampling: Sampling | None = None,
        seed: int | jax.Array = 0,
    ) -> Rollouts:
        """Rollouts of `problems` (anything with `.prompt`); `thought_mode` defaults to the
        config's, `sampling` to the config's temperature."""
        rl_config, tok = self.rl_config, self.tok
        prompts = [p.prompt for p in problems]
        prompt_ids = [encode_prompt(tok, p) for p in prompts]
        b = len(prompt_ids)
        urgency_b = group_urgency(b, group_size) if rl_config.urgency else None
        mode = thought_mode_of(thought_mode or rl_config.thought_mode, sample=True)
        th = think_then_answer(
            self.dec, prompt_ids, thought_mode=mode, think_budget=rl_config.think_budget,
            answer_max_tokens=rl_config.answer_max_tokens, urgency_b=urgency_b,
            sampling=sampling or Sampling(temperature=rl_config.temperature), seed=seed,
        )  # fmt: skip
        r1, r2 = th.thought, th.answer
        n1 = [int(x) for x in r1.lengths]
        n2 = [int(x) for x in r2.lengths]
        parts = [(th.thoughts[i], r2.tokens[i, : n2[i]]) for i in range(b)]
        offsets = [(_fit(r1.offset[i, : n1[i]], th.thoughts[i].size), 0) for i in range(b)]
        passes = [
            (
                _fit(r1.pass_id[i, : n1[i]], th.thoughts[i].size),
                r1.passes[i] + r2.pass_id[i, : n2[i]],
            )
            for i in range(b)
        ]
        masks = [(_fit(np.ones(n1[i]), th.thoughts[i].size), 1.0) for i in range(b)]
        tokens, offset, pass_, mask = _rows(
            prompt_ids, parts, offsets, passes, masks, 32, tok.specials.pad, self.dec.max_len
        )
        stop = None
        if isinstance(mode, Adaptive):  # the stop decisions, laid out as the thought's tokens
            stops = [(_fit(r1.choice[i, : n1[i]], th.thoughts[i].size), 0) for i in range(b)]
            stop = _rows(prompt_ids, parts, offsets, passes, stops, 32, 0, self.dec.max_len)[3]
        cost = th.passes.astype(np.float64) * (1.0 if urgency_b is None else urgency_b)
        return Rollouts(
            tokens=tokens, offset=offset, pass_=pass_, mask=mask, prompts=prompts,
            answers=[answer_text(tok, r2.row(i)) for i in range(b)],
            passes=th.passes, thought_passes=r1.passes.astype(np.int32),
            generated=(r1.lengths + r2.lengths).astype(np.int32), forced_close=th.forced,
            cost=cost, urgency=urgency_b, stop=stop,
        )  # fmt: skip


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    """x cut or zero-padded to length n (a forced </think> gets offset, pass and mask 0)."""
    return np.concatenate([x[:n], np.zeros(max(n - x.size, 0), x.dtype)])


def pause_decision_logprob(logits_btv, batch, lp_bt, temperature: float):
    """Where the policy chose only whether to pause (`batch['decision']`), the log-prob of
    that decision: log p(<pause>) or log(1 - p(<pause>)) under softmax(logits / T), both
    differentiated through the pause logit only (the others' log-sum-exp is held fixed), so
    a decision's advantage moves how readily the model pauses, not which answer token it
    ranks first (the answer was not sampled). Elsewhere `lp_bt` as given."""
    pause_id = int(batch["pause_id"])
    z_btv = logits_btv / temperature
    rest_bt = jax.lax.stop_gradient(jax.nn.logsumexp(z_btv.at[..., pause_id].set(-jnp.inf), -1))
    d_bt = z_btv[..., pause_id] - rest_bt  # log-odds of pausing
    dec_bt = jnp.where(
        batch["tokens"] == pause_id, jax.nn.log_sigmoid(d_bt), jax.nn.log_sigmoid(-d_bt)
    )
    return jnp.where(batch["decision"] > 0, dec_bt, lp_bt)


class PauseRollout:
    """Learned-pause rollouts of one system (module docstring)."""

    name = "pause"

    def __init__(self, system, tok: Tokenizer, rl_config: RLConfig, *, cap: int, max_answer: int):
        self.tok, self.rl_config = tok, rl_config
        self.dec = Decoder(system, tok.specials)
        self.policy = Pause("learned", cap=cap, temperature=rl_config.temperature)
        self.max_answer = max_answer
        self.token_logprob = functools.partial(_pause_logprob, pause_id=tok.specials.pause)

    def set_weights(self, system) -> None:
        self.dec.set_weights(system)

    def __call__(self, problems: Sequence, *, group_size: int = 1, seed=0) -> Rollouts:
        tok = self.tok
        b = len(problems)
        prompt_ids = [encode_prompt(tok, p.prompt, p.thought) for p in problems]
        urgency_b = group_urgency(b, group_size)
        res = self.dec.generate(
            prompt_ids, mode=self.policy, max_new_tokens=self.max_answer, sampling=Sampling(),
            urgency_b=urgency_b, seed=seed,
        )  # fmt: skip
        n = [int(x) for x in res.lengths]
        parts = [(res.tokens[i, : n[i]],) for i in range(b)]
        tokens, offset, _, mask = _rows(
            prompt_ids, parts, [(0,)] * b, [(0,)] * b, [(res.choice[i, : n[i]],) for i in range(b)],
            16, tok.specials.pad, self.dec.max_len,
        )  # fmt: skip
        t = tokens.shape[1]
        pauses = res.pauses.astype(np.float64)
        answers = [answer_text(tok, res.answer_row(i)) for i in range(b)]
        return Rollouts(
            tokens=tokens, offset=offset, mask=mask, prompts=[p.prompt for p in problems],
            pass_=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),  # each decision
            answers=answers, passes=res.passes.astype(np.int32),
            thought_passes=np.zeros(b, np.int32), generated=res.lengths.astype(np.int32),
            forced_close=np.zeros(b, bool), cost=urgency_b * pauses, urgency=urgency_b,
            pauses=pauses,
        )  # fmt: skip


def _pause_logprob(logits_btv, batch, lp_bt, temperature, *, pause_id):
    """pause_decision_logprob where every masked token was a pause decision."""
    return pause_decision_logprob(
        logits_btv, batch | {"decision": batch["mask"], "pause_id": pause_id}, lp_bt, temperature
    )


ROLLOUTS: dict[str, type] = {"think": ThinkRollout, "pause": PauseRollout}


def score_rollouts(
    ro: Rollouts,
    score: Callable[[str, str], float],
    pass_price: float = 0.0,
    credit: Callable[[str, str], float] | None = None,
) -> Rollouts:
    """Fills scores, rewards, bad and errors; never raises for a bad verifier result.

    The reward is `credit(prompt, answer)` (e.g. partial credit) if given, else the
    score, minus `pass_price` times the rollout's cost; `scores` stay the verifier's own.
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
    ro.rewards = credits - pass_price * ro.cost
    ro.bad = bad
    return ro
