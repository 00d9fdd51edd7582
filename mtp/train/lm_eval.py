"""Language-model evaluator: main loss and perplexity, drafter accuracy per offset,
agreement with the main model, and the accepted length (tokens per pass) it implies.
On cached taps (a frozen main model's, `mtp.train.self_distill`) the main model does not
run, so only the drafter's figures are reported."""

from __future__ import annotations

import math

import jax
import numpy as np


class LMEvaluator:
    """Averages `eval_step` metrics over fixed held-out batches, weighted by target count."""

    def __init__(self, eval_step, batches: list[dict]):
        self.eval_step = eval_step  # (state, batch) -> flat metrics, jitted
        self.batches = batches
        self.drafter_only = "taps" in batches[0]
        # Best constant guess (most frequent target byte): the floor any drafter must beat.
        tokens = np.concatenate([b["tokens"][:, 1:][b["loss_mask"][:, 1:] > 0] for b in batches])
        self.unigram_acc = float(np.bincount(tokens).max() / max(tokens.size, 1))

    def run(self, state):
        totals, weight = {}, 0.0
        for batch in self.batches:
            m = jax.device_get(self.eval_step(state, batch))
            w = float(m.pop("targets"))
            for name, v in m.items():
                totals[name] = totals.get(name, 0.0) + w * float(np.asarray(v))
            weight += w
        means = {name: v / max(weight, 1.0) for name, v in totals.items()}
        if not self.drafter_only:
            yield "main_loss", means["loss/main"]
            yield "perplexity", math.exp(min(means["loss/main"], 50.0))
        yield "draft_loss", means["loss/draft"]
        yield "draft_coverage", means["draft_coverage"]
        if not self.drafter_only:
            yield "main_acc", means["acc/main"]
        for name in sorted(n for n in means if n.startswith(("acc/draft_", "agree/draft_"))):
            yield name.replace("/", "_"), means[name]
        yield "unigram_acc", self.unigram_acc
        yield "accepted_len", means["accepted_len"]
        yield "tokens_per_pass", 1.0 + means["accepted_len"]
