"""What one batched decoding call returns: tokens, per-token provenance, statistics."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class DecodeResult:
    """Output of one batched call. Arrays are numpy; O = the call's cache slots
    (`shapes.cache_slots`: at most the model's max_len).

    tokens (B, O): emitted tokens, pad past `lengths` (pause mode: pauses and
    answer tokens in decision order); pass_id (B, O): the main pass that
    produced each token (0 = prefill pass; an accepted draft belongs to the
    pass that drafted it); offset (B, O): 0 for a main token, j for a draft at
    offset j; forced (B, O): the engine, not the policy, chose the token (leave
    it out of log-probs); choice (B, O): pause mode, the policy could have
    paused there (adaptive with sampled decisions: the policy ended its pass
    after it); valid (B, O): j < lengths[b]. passes (B,): main passes each
    row ran (pauses in the prompt count one each); accept_hist (K + 1,):
    speculative verify passes that accepted n = 0..K drafts, adaptive passes
    that kept n drafts (zeros otherwise).
    """

    mode: str
    k: int
    tokens: np.ndarray
    pass_id: np.ndarray
    offset: np.ndarray
    lengths: np.ndarray
    passes: np.ndarray
    accept_hist: np.ndarray
    batch_passes: int  # loop iterations, prefill included (rows share them)
    wall_s: float
    compiled: bool  # this call traced and compiled a new decoder (wall_s includes it)
    forced: np.ndarray
    choice: np.ndarray
    prompt_pauses: np.ndarray  # (B,) pauses appended to each prompt (fixed pause policy)
    pause_id: int
    # generate(keep_taps=True): (B, O, L, D) the main model's taps by position, at every
    # prompt position and every emitted token (the pass after a row's last advance feeds
    # its last tokens too); past them not meaningful (zeros, the prefill's taps of prompt
    # padding, a last speculative pass's drafts)
    taps: np.ndarray | None = None

    @property
    def valid(self) -> np.ndarray:
        return np.arange(self.tokens.shape[1]) < self.lengths[:, None]

    def row(self, b: int) -> np.ndarray:
        return self.tokens[b, : self.lengths[b]]

    def answer_row(self, b: int) -> np.ndarray:
        """Row b without its pauses."""
        row = self.row(b)
        return row[row != self.pause_id]

    @property
    def pauses(self) -> np.ndarray:
        """(B,) pauses each row spent: decoded ones plus those in the prompt."""
        return ((self.tokens == self.pause_id) & self.valid).sum(1) + self.prompt_pauses

    def texts(self, tokenizer, skip_special: bool = False) -> list[str]:
        return [tokenizer.decode(self.row(b), skip_special) for b in range(len(self.lengths))]

    @property
    def stats(self) -> dict:
        tokens, passes = int(self.lengths.sum()), int(self.passes.sum())
        verified = int(self.accept_hist.sum())
        out = dict(
            mode=self.mode,
            k=self.k,
            batch=len(self.lengths),
            tokens=tokens,
            main_passes=self.batch_passes,
            row_passes=passes,
            tokens_per_pass=tokens / max(passes, 1),
            wall_s=self.wall_s,
            tokens_per_s=tokens / self.wall_s if self.wall_s > 0 else float("nan"),
            compiled=self.compiled,
        )
        if self.forced.any():
            out["forced"] = int((self.forced & self.valid).sum())
        if self.mode == "pause":
            answer = tokens - int(self.pauses.sum()) + int(self.prompt_pauses.sum())
            out["pauses"] = float(self.pauses.mean())
            out["tokens_per_pass"] = answer / max(passes, 1)
        if self.mode == "adaptive":  # tokens per pass: 1 + the drafts kept
            n_k = np.arange(self.k + 1)
            out["tokens_per_pass_hist"] = {
                int(n + 1): int(c) for n, c in zip(n_k, self.accept_hist, strict=True)
            }
            out["mean_kept"] = float((n_k * self.accept_hist).sum() / max(verified, 1))
        if self.mode == "speculative":
            n_k = np.arange(self.k + 1)
            out["accept_hist"] = self.accept_hist.tolist()
            out["mean_accepted"] = float((n_k * self.accept_hist).sum() / max(verified, 1))
            # offset j accepted in a verify pass iff n >= j
            out["accept_rate"] = [
                float(self.accept_hist[j:].sum() / max(verified, 1)) for j in range(1, self.k + 1)
            ]
        return out
