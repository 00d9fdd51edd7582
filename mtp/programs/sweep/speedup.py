"""Speculative speedup of a trained run: slow vs speculative greedy decoding, batch 1.

Prompts are the first `prompt_len` tokens of held-out rows (the eval split of
the run's own corpus, rows spread over the split). Each prompt is decoded
greedily for `new_tokens` tokens in `slow` and in `speculative` mode, one
prompt at a time; both decoders are compiled first, and each timing is the
best of `repeats` (the machine may be shared). Greedy speculative output must
equal slow output token for token: `identical` records whether it did.
"""

from __future__ import annotations

import numpy as np

from mtp.config import Run, SweepConfig
from mtp.data.pipeline import packed_rows
from mtp.data.tokenizer import Tokenizer
from mtp.decode.engine import Decoder


def held_out_prompts(run: Run, tok: Tokenizer, n: int, prompt_len: int) -> list[np.ndarray]:
    """`n` prompts of `prompt_len` tokens from held-out rows without padding."""
    rows = packed_rows(run.data, tok, "eval")[0][:, :prompt_len]
    rows = rows[(rows != tok.specials.pad).all(1)]
    if rows.shape[0] == 0:
        return []
    idx = np.linspace(0, rows.shape[0] - 1, min(n, rows.shape[0])).round().astype(int)
    return [rows[i] for i in idx]


def measure_speedup(
    system, tok: Tokenizer, prompts: list[np.ndarray], sweep_config: SweepConfig
) -> dict:
    """Tokens/s, tokens per pass and mean accepted drafts of both modes, and their ratio."""
    dec = Decoder(system, tok.specials)
    kw = dict(max_new_tokens=sweep_config.new_tokens)
    for mode in ("slow", "speculative"):  # compile both before timing
        dec.generate([prompts[0]], mode=mode, **kw)
    wall = {"slow": [], "speculative": []}
    tokens, passes, hist, identical = {}, {}, 0, True
    for p in prompts:
        best = {}
        for _ in range(sweep_config.repeats):
            for mode in ("slow", "speculative"):  # interleaved: contention hits both alike
                res = dec.generate([p], mode=mode, **kw)
                if mode not in best or res.wall_s < best[mode].wall_s:
                    best[mode] = res
        for mode, res in best.items():
            wall[mode].append(res.wall_s)
            tokens[mode] = tokens.get(mode, 0) + int(res.lengths.sum())
            passes[mode] = passes.get(mode, 0) + int(res.passes.sum())
        hist = hist + best["speculative"].accept_hist
        identical &= np.array_equal(best["slow"].row(0), best["speculative"].row(0))
    out = {"prompts": len(prompts), "prompt_len": int(prompts[0].size), "k": dec.k}
    for mode, short in (("slow", "slow"), ("speculative", "spec")):
        out[f"{short}_tokens_per_s"] = tokens[mode] / max(sum(wall[mode]), 1e-9)
        out[f"{short}_tokens_per_pass"] = tokens[mode] / max(passes[mode], 1)
    hist = np.asarray(hist, np.float64)
    out["spec_mean_accepted"] = float((np.arange(hist.size) * hist).sum() / max(hist.sum(), 1))
    out["speedup"] = out["spec_tokens_per_s"] / max(out["slow_tokens_per_s"], 1e-9)
    out["identical"] = bool(identical)
    return out
