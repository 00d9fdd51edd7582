"""Task accuracy against main passes: greedy think-mode decoding of held-out problems."""

from __future__ import annotations

import numpy as np

from mtp.data.tasks import Task
from mtp.decode.sampling import Sampling
from mtp.train.rl_rollout import ThinkRollout, score_rollouts


class TaskAccuracy:
    """Decodes `n` held-out problems greedily (thought in `thought_mode` within
    `think_budget` main passes, answer in slow mode) and yields accuracy, main
    passes per answer, thought passes, tokens per pass and how often the budget
    cut the thought; in fast mode also how many answers had every draft equal to
    the main model's own greedy choice, and the accuracy of those and of the rest
    (where fast mode loses to slow). Batches are padded with repeats so every call
    has one shape.
    """

    def __init__(
        self,
        task: Task,
        n: int,
        *,
        thought_mode: str = "fast",
        think_budget: int = 0,
        answer_max_tokens: int = 16,
        batch_size: int = 64,
    ):
        self.task = task
        self.prompts = [ex.prompt for ex in task.examples("eval", n)]
        self.kw = dict(
            thought_mode=thought_mode, think_budget=think_budget,
            answer_max_tokens=answer_max_tokens, sampling=Sampling(),
        )  # fmt: skip
        self.batch_size = min(batch_size, n)
        self.fast = thought_mode == "fast"

    def run(self, roll: ThinkRollout):
        scores, passes, thought, generated, forced, agree = [], [], [], [], [], []
        bs = self.batch_size
        for i in range(0, len(self.prompts), bs):
            chunk = self.prompts[i : i + bs]
            padded = chunk + [chunk[-1]] * (bs - len(chunk))
            ro = score_rollouts(roll(padded, **self.kw), self.task.score)
            n = len(chunk)
            scores.append(np.nan_to_num(ro.scores[:n]))  # a verifier failure counts as wrong
            passes.append(ro.passes[:n])
            thought.append(ro.thought_passes[:n])
            generated.append(ro.generated[:n])
            forced.append(ro.forced_close[:n])
            if self.fast:
                agree.append(roll.drafts_agree(ro)[:n])
        cat = np.concatenate
        yield "accuracy", float(cat(scores).mean())
        yield "passes", float(cat(passes).mean())
        yield "thought_passes", float(cat(thought).mean())
        yield "tokens_per_pass", float(cat(generated).sum() / max(cat(passes).sum(), 1))
        yield "forced_close", float(cat(forced).mean())
        if self.fast:
            agree, scores = cat(agree), cat(scores)
            share = lambda x: float(x.mean()) if x.size else float("nan")
            yield "drafts_agree", share(agree)
            yield "accuracy_if_agree", share(scores[agree])
            yield "accuracy_if_not", share(scores[~agree])
