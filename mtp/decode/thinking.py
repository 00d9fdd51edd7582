"""Think within a budget of main passes, then answer: the one "think, force `</think>`,
then answer" composition, used by the CLI, RL rollouts, evaluation and pause decoding.

Prompts end inside a thinking span (`<bos> P <think>`). Two engine calls:

1. the thought, in `thought_mode` (`fast`: 1 + k tokens per pass, drafts
   unverified; `adaptive`: 1 to 1 + k; `slow`: one), stopping at `</think>` or
   after `think_budget` passes (and at most `budget * width` tokens; 0: until
   the cache leaves just room for the answer); drafts after a `</think>` are
   dropped, as the `think` mode does. A thought cut by the budget gets a
   `</think>` the policy did not choose (`forced`);
2. the answer, in `answer_mode` (`slow`, or a `Pause` policy) from prompt +
   thought, stopping at `<eos>`.

Main passes are counted honestly: the thought call's passes (its prefill is
the first thought pass) plus the answer call's (its prefill is the pass that
emits the first answer token, having read the thought's last tokens).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from mtp.decode.engine import GREEDY, Decoder
from mtp.decode.modes import Mode, make_mode
from mtp.decode.result import DecodeResult
from mtp.decode.sampling import Sampling
from mtp.errors import DecodeError


@dataclasses.dataclass
class Thought:
    """A batch's thoughts and answers. prompt_ids[b]: the prompt ids; thoughts[b]: the thought's
    ids ending with </think>; forced (B,): that </think> was forced by the budget."""

    prompt_ids: list[np.ndarray]
    thoughts: list[np.ndarray]
    forced: np.ndarray
    thought: DecodeResult  # the thought call (stopped at </think>)
    answer: DecodeResult  # the answer call

    @property
    def passes(self) -> np.ndarray:
        """(B,) main passes of thought and answer."""
        return (self.thought.passes + self.answer.passes).astype(np.int32)


def think_then_answer(
    dec: Decoder,
    prompt_ids: Sequence[np.ndarray],
    *,
    thought_mode: str | Mode = "fast",
    think_budget: int = 0,
    answer_mode: str | Mode = "slow",
    answer_max_tokens: int = 16,
    sampling: Sampling = GREEDY,
    seed: int | jax.Array = 0,
    urgency_b=None,
) -> Thought:
    """Decodes a thought within `think_budget` passes, then the answer (module docstring)."""
    thought_mode, answer_mode = make_mode(thought_mode), make_mode(answer_mode)
    if think_budget < 0:
        raise DecodeError(f"think_budget must be >= 0 passes, got {think_budget!r}")
    prompt_ids = [np.asarray(h, np.int32) for h in prompt_ids]
    longest = max(h.size for h in prompt_ids)
    answer_room = (
        answer_max_tokens
        + answer_mode.extra_positions(answer_max_tokens)
        + answer_mode.prompt_pauses()
    )
    room = dec.max_len - longest - answer_room - 1  # -1: a forced </think>
    if room < 1:
        raise DecodeError(
            f"prompts of {longest} tokens + an answer of up to {answer_room} positions leave no "
            f"room to think in model.max_len={dec.max_len}; raise model.max_len"
        )
    per_pass = thought_mode.width(dec.k)
    limit = min(room, think_budget * per_pass) if think_budget else room
    key1, key2 = jax.random.split(jax.random.key(seed) if isinstance(seed, int) else seed)
    close = dec.specials.think_close
    r1 = dec.generate(
        prompt_ids, mode=thought_mode, max_new_tokens=limit, sampling=sampling, seed=key1,
        urgency_b=urgency_b, stop_id=close, max_passes=think_budget,
    )  # fmt: skip
    thoughts, forced = [], np.zeros(len(prompt_ids), bool)
    for i in range(len(prompt_ids)):
        row = r1.row(i)
        forced[i] = row.size == 0 or row[-1] != close
        thoughts.append(np.append(row, close).astype(np.int32) if forced[i] else row)
    r2 = dec.generate(
        [np.concatenate([h, t]) for h, t in zip(prompt_ids, thoughts, strict=True)],
        mode=answer_mode, max_new_tokens=answer_max_tokens, sampling=sampling, seed=key2,
        urgency_b=urgency_b,
    )  # fmt: skip
    return Thought(prompt_ids, thoughts, forced, r1, r2)
