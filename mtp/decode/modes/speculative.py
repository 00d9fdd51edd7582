"""`speculative`: the drafts are verified by the next main pass; lossless.

Greedy output equals `slow` greedy token for token; sampled output is
distributed exactly as `slow` sampling. Exactly means with float32 matrix
products: JAX's default precision rounds float32 products to TensorFloat32 on
recent NVIDIA GPUs and to bfloat16 on TPUs, where a wide verification pass and a
one-token pass round apart and near-ties can flip, as in bfloat16 (use
`jax.default_matmul_precision("float32")` there). A chain (the default) feeds
[y0, d_1..d_K] and keeps the main logits at all K + 1 places, so the next
advance can verify the K drafts (the rules of `mtp.decode.speculative`,
Leviathan et al. 2023). With `tree_nodes` = N a pass feeds y0 and a dynamic
draft tree of N nodes (EAGLE-2: `tree_beams` beams expanded `tree_depth` steps,
default K, the N likeliest paths' nodes kept), verified in the same one pass
under a tree attention mask (the rules of `mtp.decode.tree`); the accepted
path's keys and values move to their positions' cache slots, the rest is left
to be overwritten.

Verification feeds W tokens per row: a pass costs about the same as a slow one
where the machine is bandwidth-bound and up to W times as much where it is
compute-bound (large batches). Past `max_batch` rows a call decodes in `slow`
mode instead, as vLLM and SGLang turn speculation off past a batch size; greedy
output is the same either way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.config import ConfigError
from mtp.decode import speculative, tree
from mtp.decode.modes.base import Carry, Ctx, Mode, at, draft, emit, root, split_keys
from mtp.decode.modes.slow import Slow
from mtp.decode.sampling import choose, log_probs
from mtp.model.transformer import FedTree

# Rows per call past which speculation is off by default, by backend (absent: never). On 2 CPU
# cores with SmolLM2-135M and its drafter (1.8 drafts accepted per pass) speculative decoding
# ran at 1.6-1.7x slow at batch 1, 1.10x at batch 4 and 0.98x at batch 8 (benchmarks/decode.py,
# 2026-12-04, caches sized to the call). On an NVIDIA H200 it ran at 1.37x slow at batch 8 (a
# pass there is bound by kernel latency, not by the weights' bytes), so GPUs have no entry.
MAX_BATCH = {"cpu": 4}


@dataclasses.dataclass(frozen=True)
class Speculative(Mode):
    tree_nodes: int = 0  # N > 0: verify a draft tree of N nodes, not a chain of K
    tree_beams: int = 4  # M: paths kept at each expansion step
    tree_depth: int = 0  # D: expansion steps (0: K)
    max_batch: int | None = None  # more rows: slow (0: never; None: the backend's MAX_BATCH)

    name = "speculative"
    all_logits = True
    extra_kind = "tree slots"

    def __post_init__(self):
        if self.max_batch is not None and self.max_batch < 0:
            raise ConfigError(
                f"speculative max_batch={self.max_batch}: need >= 0 (0: speculate at any batch "
                "size) or None (the backend's default)"
            )
        if self.tree_nodes < 0 or self.tree_beams < 1 or self.tree_depth < 0:
            raise ConfigError(
                f"speculative tree: need tree_nodes >= 0 (0 = a chain), tree_beams >= 1, "
                f"tree_depth >= 0 (0 = k), got {self.tree_nodes}, {self.tree_beams}, "
                f"{self.tree_depth}"
            )

    def for_batch(self, b: int) -> Mode:
        limit = self.max_batch
        limit = MAX_BATCH.get(jax.default_backend(), 0) if limit is None else limit
        return Slow() if limit and b > limit else self

    def depth(self, k: int) -> int:
        d = self.tree_depth or k
        if d > k:
            raise ConfigError(f"speculative tree_depth={d} exceeds the drafter's k={k}")
        if self.tree_nodes > d * self.tree_beams:
            raise ConfigError(
                f"speculative tree_nodes={self.tree_nodes}: at most tree_depth x tree_beams = "
                f"{d * self.tree_beams}"
            )
        return d

    def width(self, k: int) -> int:
        return 1 + self.tree_nodes if self.tree_nodes else k + 1

    def extra_positions(self, max_new: int) -> int:
        """A tree node's slot runs up to N - 1 past its position (a depth-1 node fed last)."""
        return max(0, self.tree_nodes - 1)

    @property
    def feeds_trees(self) -> bool:
        return bool(self.tree_nodes)

    def tree(self, c: Carry):
        if not self.tree_nodes:
            return None
        parent_bw = c.extra["parent_bw"]  # a path has at most W - 1 nodes below the root
        return FedTree(c.extra["depth_bw"], tree.ancestors(parent_bw, parent_bw.shape[1] - 1))

    def init(self, b, k, v, sampling, thinking_b) -> dict:
        if self.tree_nodes:
            w = self.width(k)
            parent_bw = jnp.full((b, w), -1, jnp.int32)  # nothing pending after the prefill
            self.depth(k)  # checks the tree's options against k
            return {"parent_bw": parent_bw, "depth_bw": jnp.zeros((b, w), jnp.int32)}
        return {
            "fresh_b": jnp.ones((b,), bool),  # no drafts pending yet (the last pass: prefill)
            # processed drafter log-probs of the pending drafts (sampling only)
            "logq_bkv": jnp.zeros((b, k, v) if not sampling.greedy else (b, 1, 1)),
        }

    def advance(self, ctx: Ctx, c: Carry) -> Carry:
        return self._advance_tree(ctx, c) if self.tree_nodes else self._advance_chain(ctx, c)

    def _advance_tree(self, ctx: Ctx, c: Carry) -> Carry:
        """Walks the pending tree, emits its accepted path and the main token after it, moves
        the path's cache entries to their positions, then drafts the next tree after the token."""
        k, d, n = ctx.k, self.depth(ctx.k), self.tree_nodes
        b = c.logits_bwv.shape[0]
        c, (kv,) = split_keys(ctx, c, 1)
        parent_bw = c.extra["parent_bw"]
        n_b, path_bd, node_b, y0_b = tree.verify_tree(
            c.logits_bwv, c.feed_bw, parent_bw, d, ctx.sampling, kv
        )
        running_b = ~c.done_b
        verified_b = running_b & (parent_bw[:, 1] >= 0)  # a tree was pending (not the prefill)
        j_d = jnp.arange(d)
        dst_bd = jnp.where(j_d < n_b[:, None], c.pos_b[:, None] + 1 + j_d, ctx.system.max_len)
        c = c._replace(
            cache=ctx.system.move_slots(c.cache, c.pos_b[:, None] + path_bd, dst_bd),
            pos_b=c.pos_b + jnp.where(running_b, n_b + 1, 0),
            hist_bk=c.hist_bk + jax.nn.one_hot(n_b, k + 1, dtype=jnp.int32) * verified_b[:, None],
        )
        j_w = jnp.arange(d + 1)
        path_tok_bd = jnp.take_along_axis(c.feed_bw, path_bd, axis=1)
        acc_bw = j_w < n_b[:, None]
        old_bw = jnp.concatenate([path_tok_bd, jnp.zeros((b, 1), jnp.int32)], axis=1)
        tok_bw = jnp.where(acc_bw, old_bw, y0_b[:, None])
        pass_bw = jnp.where(acc_bw, c.step - 1, c.step)  # a draft belongs to the pass before
        c = emit(ctx, c, tok_bw, n_b + 1, pass_bw, jnp.where(acc_bw, j_w + 1, 0))
        # the tree holds the drafter's likeliest paths whatever the sampling: no draws
        cand = ctx.system.draft_tree(
            at(c.taps_bwld, node_b), y0_b, self.tree_beams, d, c.cache, root(c), ctx.tables
        )
        tok_bn, parent_bn, depth_bn = tree.select_nodes(*cand, n)
        parent_bw = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), parent_bn], axis=1)
        return c._replace(
            feed_bw=jnp.concatenate([y0_b[:, None], tok_bn], axis=1),
            nfeed_b=jnp.full((b,), n + 1, jnp.int32),
            extra={
                "parent_bw": parent_bw,
                "depth_bw": jnp.concatenate([jnp.zeros((b, 1), jnp.int32), depth_bn], axis=1),
            },
        )

    def _advance_chain(self, ctx: Ctx, c: Carry) -> Carry:
        """Verifies the pending drafts, emits the n accepted ones and the main token after them
        (correction or bonus), then drafts K more after that token."""
        s, k = ctx.sampling, ctx.k
        b = c.logits_bwv.shape[0]
        fresh_b, logq_bkv = c.extra["fresh_b"], c.extra["logq_bkv"]
        c, (kv, ky, kd) = split_keys(ctx, c, 3)
        drafts_bk = c.feed_bw[:, 1:]
        if s.greedy:  # after the prefill the pending "drafts" are -1: none accepted
            n_b, y0_b = speculative.verify_greedy(c.logits_bwv, drafts_bk)
        else:
            logp_bwv = log_probs(c.logits_bwv, s)
            n_b, y0_b = speculative.verify_sampled(logp_bwv, logq_bkv, drafts_bk, kv)
            # after the prefill nothing is pending: y0 is drawn from the prompt's next-token law
            n_b = jnp.where(fresh_b, 0, n_b)
            y0_b = jnp.where(fresh_b, choose(c.logits_bwv[:, 0], s, ky), y0_b)
        running_b = ~c.done_b
        verified_b = running_b & ~fresh_b
        c = c._replace(
            pos_b=c.pos_b + jnp.where(running_b, n_b + 1, 0),
            hist_bk=c.hist_bk + jax.nn.one_hot(n_b, k + 1, dtype=jnp.int32) * verified_b[:, None],
        )
        new_bk, new_logq_bkv = draft(ctx, c, at(c.taps_bwld, n_b), y0_b, kd)
        j_w = jnp.arange(k + 1)
        old_bw = jnp.concatenate([drafts_bk, jnp.zeros((b, 1), jnp.int32)], axis=1)
        acc_bw = j_w < n_b[:, None]
        tok_bw = jnp.where(acc_bw, old_bw, y0_b[:, None])
        pass_bw = jnp.where(acc_bw, c.step - 1, c.step)  # a draft belongs to the pass before
        off_bw = jnp.where(acc_bw, j_w + 1, 0)
        c = emit(ctx, c, tok_bw, n_b + 1, pass_bw, off_bw)
        return c._replace(
            feed_bw=jnp.concatenate([y0_b[:, None], new_bk], axis=1),
            nfeed_b=jnp.full((b,), k + 1, jnp.int32),
            extra={
                "fresh_b": jnp.zeros_like(fresh_b),
                "logq_bkv": logq_bkv if new_logq_bkv is None else new_logq_bkv,
            },
        )
