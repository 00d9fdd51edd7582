"""Main model + drafter as one policy; the only module that knows both.

A pass at position t emits the main token y_0 = x_{t+1} and drafts
y_j = x_{t+1+j}, j = 1..k. The training forward scores all positions at once
with teacher forcing: the drafter at t is fed the true x_{t+1..t+k}, so
draft logits at (t, j) depend only on tokens x_{<=t+j} and never on their own
target x_{t+1+j}.

Decoding goes through the same object: `init_cache` and `main_pass` run the
main model incrementally, `draft` the drafter; nothing outside reads
`system.main` or `system.drafter`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.model.drafter import make_drafter
from mtp.model.transformer import Transformer


def shifted(tokens_bt: jax.Array, k: int, pad_id: int, start: int = 1) -> jax.Array:
    """(B, T, k) with [b, t, j] = tokens[b, t + start + j], `pad_id` past the end."""
    b, t = tokens_bt.shape
    padded = jnp.concatenate([tokens_bt, jnp.full((b, start + k), pad_id, tokens_bt.dtype)], 1)
    return jnp.stack([padded[:, start + j : start + j + t] for j in range(k)], axis=-1)


class MTPSystem(nnx.Module):
    def __init__(self, main: ModelConfig, drafter: DrafterConfig, *, pad_id: int, rngs: nnx.Rngs):
        self.main = Transformer(main, rngs=rngs)
        self.drafter = make_drafter(drafter, main, rngs=rngs)
        self.k = drafter.k
        self.detach = drafter.detach
        self.pad_id = pad_id

    @property
    def max_len(self) -> int:
        """Longest sequence the main model (and its KV cache) supports."""
        return self.main.cfg.max_len

    @property
    def vocab_size(self) -> int:
        return self.main.cfg.vocab_size

    @property
    def use_urgency(self) -> bool:
        """Does the main model take an urgency input (`urgency_b`)?"""
        return self.main.cfg.use_urgency

    def set_detach(self, flag: bool) -> None:
        """Stop (True) or pass (False) the drafter's gradient into the main model via the taps."""
        self.detach = bool(flag)

    def taps_for_drafter(self, taps_btld):
        return jax.lax.stop_gradient(taps_btld) if self.detach else taps_btld

    def init_cache(self, batch: int):
        """Empty main-model KV cache for `batch` rows of up to `max_len` tokens."""
        return self.main.init_cache(batch)

    def main_pass(self, tokens_bw, pos_b, cache, urgency_b=None):
        """The main model over W tokens per row at positions pos_b[:, None] + 0..W-1, with the
        KV cache. Returns logits (B, W, V), taps (B, W, L, D) as the drafter reads them (the
        detach rule applied) and the cache."""
        pos_bw = pos_b[:, None] + jnp.arange(tokens_bw.shape[1])
        logits_bwv, taps_bwld, cache = self.main(tokens_bw, pos_bw, cache, urgency_b=urgency_b)
        return logits_bwv, self.taps_for_drafter(taps_bwld), cache

    def draft(self, taps_bld, y0_b, choose):
        """Drafts k tokens after y0 (B,) from taps (B, L, D) given by `main_pass`:
        tokens (B, k) and logits (B, k, V); `choose(logits_bv, j)` picks each."""
        return self.drafter.draft(taps_bld, y0_b, choose)

    def __call__(self, tokens_bt, urgency_b=None):
        """Teacher-forced forward: main logits (B, T, V) and draft logits (B, T, k, V)."""
        logits_btv, taps_btld, _ = self.main(tokens_bt, urgency_b=urgency_b)
        inputs_btk = shifted(tokens_bt, self.k, self.pad_id)  # y_0..y_{k-1} at each t
        draft_btkv = self.drafter(self.taps_for_drafter(taps_btld), inputs_btk)
        return logits_btv, draft_btkv

    def pass_logprobs(self, tokens_bt, urgency_b=None):
        """Log-prob of every token under the policy, split by who emitted it.

        Returns main_bt[b, t] = log p_main(x_{t+1} | x_<=t) and
        draft_btk[b, t, j] = log p_draft(x_{t+2+j} | h_t, x_{t+1..t+1+j}).
        A pass starting at t scores main_bt[t] + sum_j draft_btk[t, j]; the
        drafter term carries gradient into the main model through h_t.
        """
        logits_btv, draft_btkv = self(tokens_bt, urgency_b)
        main_lp = jax.nn.log_softmax(logits_btv)
        draft_lp = jax.nn.log_softmax(draft_btkv)
        nxt_bt = shifted(tokens_bt, 1, self.pad_id)[..., 0]
        tgt_btk = shifted(tokens_bt, self.k, self.pad_id, start=2)
        main_bt = jnp.take_along_axis(main_lp, nxt_bt[..., None], -1)[..., 0]
        draft_btk = jnp.take_along_axis(draft_lp, tgt_btk[..., None], -1)[..., 0]
        return main_bt, draft_btk
