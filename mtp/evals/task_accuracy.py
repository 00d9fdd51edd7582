"""Task accuracy against main passes: greedy think-then-answer decoding of held-out problems."""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from mtp.data.format import answer_text, encode_prompt
from mtp.data.tasks import Task
from mtp.data.tokenizer import Tokenizer
from mtp.decode.engine import Decoder
from mtp.decode.modes import Mode, make_mode
from mtp.decode.thinking import Thought, think_then_answer


@functools.lru_cache(maxsize=8)
def _greedy_fn(graphdef):
    return jax.jit(lambda state, tokens_bt: nnx.merge(graphdef, state)(tokens_bt)[0].argmax(-1))


def drafts_agree(system, th: Thought, pad: int) -> np.ndarray:
    """(B,) bool: every draft of the thought is the main model's own greedy token in its context
    (what speculative decoding would accept: fast mode wrote what slow mode would have).
    True for a thought with no drafts. One teacher-forced forward of the batch."""
    rows = [np.concatenate([h, t]) for h, t in zip(th.prompt_ids, th.thoughts, strict=True)]
    t = -(-max(r.size for r in rows) // 32) * 32  # few shapes: few compiles
    tokens_bt = np.full((len(rows), t), pad, np.int32)
    drafted_bt = np.zeros((len(rows), t), bool)
    for i, (r, h) in enumerate(zip(rows, th.prompt_ids, strict=True)):
        n = int(th.thought.lengths[i])
        tokens_bt[i, : r.size] = r
        drafted_bt[i, h.size : h.size + n] = th.thought.offset[i, :n] > 0
    graphdef, state = nnx.split(system)
    greedy_bt = np.asarray(_greedy_fn(graphdef)(state, tokens_bt))  # choice after position t
    agree_bt = np.ones_like(drafted_bt)
    agree_bt[:, 1:] = tokens_bt[:, 1:] == greedy_bt[:, :-1]
    return (agree_bt | ~drafted_bt).all(1)


class TaskAccuracy:
    """Decodes `n` held-out problems greedily (thought in `thought_mode` within
    `think_budget` main passes, answer in slow mode) and yields accuracy, main
    passes per answer, thought passes, tokens per pass and how often the budget
    cut the thought; in a drafting mode (fast, adaptive) also how many answers had
    every draft equal to the main model's own greedy choice, and the accuracy of
    those and of the rest (where fast mode loses to slow). `urgency` is the
    input of every pass (None: none). Batches are padded with repeats so every
    call has one shape.
    """

    def __init__(
        self,
        task: Task,
        tok: Tokenizer,
        n: int,
        *,
        thought_mode: str | Mode = "fast",
        think_budget: int = 0,
        answer_max_tokens: int = 16,
        batch_size: int = 64,
        urgency: float | None = None,
    ):
        self.task, self.tok = task, tok
        self.prompts = [ex.prompt for ex in task.examples("eval", n)]
        self.kw = dict(
            thought_mode=thought_mode, think_budget=think_budget,
            answer_max_tokens=answer_max_tokens, urgency_b=urgency,
        )  # fmt: skip
        self.batch_size = min(batch_size, n)
        self.drafting = make_mode(thought_mode).name != "slow"

    def run(self, system):
        dec = Decoder(system, self.tok.specials)
        scores, passes, thought, generated, forced, agree = [], [], [], [], [], []
        bs = self.batch_size
        for i in range(0, len(self.prompts), bs):
            chunk = self.prompts[i : i + bs]
            padded = chunk + [chunk[-1]] * (bs - len(chunk))
            th = think_then_answer(dec, [encode_prompt(self.tok, p) for p in padded], **self.kw)
            n = len(chunk)
            for j, p in enumerate(chunk):
                try:
                    s = float(self.task.score(p, answer_text(self.tok, th.answer.row(j))))
                except Exception:  # noqa: BLE001 - a verifier failure counts as wrong
                    s = 0.0
                scores.append(s if np.isfinite(s) else 0.0)
            passes.append(th.passes[:n])
            thought.append(th.thought.passes[:n])
            generated.append((th.thought.lengths + th.answer.lengths)[:n])
            forced.append(th.forced[:n])
            if self.drafting:
                agree.append(drafts_agree(system, th, self.tok.specials.pad)[:n])
        cat = np.concatenate
        scores = np.asarray(scores)
        yield "accuracy", float(scores.mean())
        yield "passes", float(cat(passes).mean())
        yield "thought_passes", float(cat(thought).mean())
        yield "tokens_per_pass", float(cat(generated).sum() / max(cat(passes).sum(), 1))
        yield "forced_close", float(cat(forced).mean())
        if self.drafting:
            agree = cat(agree)
            share = lambda x: float(x.mean()) if x.size else float("nan")
            yield "drafts_agree", share(agree)
            yield "accuracy_if_agree", share(scores[agree])
            yield "accuracy_if_not", share(scores[~agree])
