"""Draft trees: which drafted candidates a verify pass feeds, and which path it accepts.

The drafter expands M beams for D steps (`DrafterBase.draft_tree`): D·M candidate
tokens, each with the log-probability of its path. `select_nodes` keeps the N
most likely (EAGLE-2's reranking: a child's path is never likelier than its
parent's, so the kept set is a tree) and lays them out after the root y0 as
one verify pass's feed of W = 1 + N tokens, parents before children.

`verify_tree` walks the fed tree from the root. At a node whose main
distribution is p, the children are tried in feed order:

- greedy: the child equal to argmax p is accepted; the output equals slow
  greedy token for token;
- sampled: recursive rejection with point-mass drafts (SpecInfer; EAGLE's
  tree sampling): child x_i is accepted with probability p_i(x_i), where p_i
  is p with the children rejected before it removed and renormalised; if all
  are rejected the token is drawn from p without them. Every token so emitted
  is distributed as p, whatever tokens the tree holds, so the output is
  distributed as slow sampling.

W fed tokens (index 0 the root), D depth, M beams, N nodes (W = 1 + N), V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp.decode.sampling import Sampling, log_probs

EPS_DEPTH = 1e-5  # ranks a child strictly after a parent of equal path log-prob


def select_nodes(tok_bdm, lp_bdm, parent_bdm, n: int):
    """The n candidates with the likeliest paths as a tree after the root.

    tok_bdm: full-vocabulary tokens; lp_bdm: their paths' log-probs; parent_bdm:
    the beam at depth j - 1 each extends (depth 0: the root's children). Returns
    tokens (B, N), the feed index of each one's parent (B, N; 0 = the root) and
    depths (B, N) in 1..D, ordered by path log-prob, so a parent comes first.
    """
    b, d, m = tok_bdm.shape
    depth_c = 1 + jnp.arange(d * m) // m  # candidate c = j * M + beam
    key_bc = lp_bdm.reshape(b, d * m) - EPS_DEPTH * depth_c
    _, sel_bn = jax.lax.top_k(key_bc, n)
    par_bc = jnp.concatenate(
        [jnp.full((b, m), -1), (jnp.arange(d - 1)[:, None] * m + parent_bdm[:, 1:]).reshape(b, -1)],
        axis=1,
    )  # the parent's candidate index, -1 for the root
    rows_b1 = jnp.arange(b)[:, None]
    feed_bc = jnp.zeros((b, d * m), jnp.int32).at[rows_b1, sel_bn].set(1 + jnp.arange(n))
    par_bn = jnp.take_along_axis(par_bc, sel_bn, axis=1)
    parent_bn = jnp.where(par_bn < 0, 0, jnp.take_along_axis(feed_bc, jnp.maximum(par_bn, 0), 1))
    tok_bn = jnp.take_along_axis(tok_bdm.reshape(b, -1), sel_bn, axis=1)
    return tok_bn, parent_bn, depth_c[sel_bn]


def ancestors(parent_bw, depth: int):
    """(B, W, W) bool: fed token t' is t itself or one of its ancestors (parent_bw (B, W):
    each token's parent's feed index; the root's, and unused tokens', -1)."""
    w = parent_bw.shape[1]
    up_bw = jnp.maximum(parent_bw, 0)
    cur_bw = jnp.broadcast_to(jnp.arange(w), parent_bw.shape)
    anc_bww = cur_bw[:, :, None] == jnp.arange(w)
    for _ in range(depth):
        cur_bw = jnp.take_along_axis(up_bw, cur_bw, axis=1)
        anc_bww |= cur_bw[:, :, None] == jnp.arange(w)
    return anc_bww


def sampled_step(logp_bv, tok_bw, kids_bw, key_u, key_r):
    """One node's sampled verification: which children (kids_bw) recursive rejection accepts
    (the first True is taken) and the token drawn if it accepts none (B,), from the node's
    processed main log-probs (B, V)."""
    b, w = tok_bw.shape
    p_bv = jnp.exp(logp_bv)
    px_bw = jnp.where(kids_bw, jnp.take_along_axis(p_bv, tok_bw, axis=1), 0.0)
    before_bw = jnp.cumsum(px_bw, axis=1) - px_bw  # mass of the siblings tried first
    u_bw = jax.random.uniform(key_u, (b, w))
    acc_bw = kids_bw & (u_bw * (1.0 - before_bw) < px_bw)
    tried_bv = jnp.zeros(p_bv.shape, bool).at[jnp.arange(b)[:, None], tok_bw].max(kids_bw)
    rest_bv = jnp.where(tried_bv, -jnp.inf, logp_bv)
    # rounding: children holding all of p's mass may all be rejected (p ~ 1e-7)
    rest_bv = jnp.where(jnp.isfinite(rest_bv).any(-1, keepdims=True), rest_bv, logp_bv)
    return acc_bw, jax.random.categorical(key_r, rest_bv, axis=-1).astype(jnp.int32)


def verify_tree(logits_bwv, tok_bw, parent_bw, depth: int, s: Sampling, key):
    """Walks the fed tree from the root (the rules above).

    logits_bwv: main logits at the W fed tokens; tok_bw, parent_bw: the feed and
    each token's parent's feed index (-1: none; a tree with no children accepts
    nothing). Returns the accepted depth n (B,), the feed index of the accepted
    node at depths 1..D (B, D; 0 past n), the deepest accepted node's feed index
    (B,; 0 = the root) and the main token after it (B,).
    """
    b = logits_bwv.shape[0]
    if s.greedy:
        main_bw = jnp.argmax(logits_bwv, axis=-1).astype(jnp.int32)
    else:
        logp_bwv = log_probs(logits_bwv, s)
        keys = jax.random.split(key, 2 * (depth + 1))
    cur_b = jnp.zeros((b,), jnp.int32)
    alive_b = jnp.ones((b,), bool)
    n_b = jnp.zeros((b,), jnp.int32)
    path_bd = jnp.zeros((b, depth), jnp.int32)
    y_b = jnp.zeros((b,), jnp.int32)
    for j in range(depth + 1):  # a node at depth `depth` has no children: the last walk ends
        kids_bw = parent_bw == cur_b[:, None]
        if s.greedy:
            best_b = jnp.take_along_axis(main_bw, cur_b[:, None], 1)[:, 0]
            acc_bw = kids_bw & (tok_bw == best_b[:, None])
            token_b = best_b
        else:
            logp_bv = jnp.take_along_axis(logp_bwv, cur_b[:, None, None], 1)[:, 0]
            acc_bw, token_b = sampled_step(logp_bv, tok_bw, kids_bw, keys[2 * j], keys[2 * j + 1])
        step_b = alive_b & jnp.any(acc_bw, axis=1)
        ends_b = alive_b & ~step_b
        y_b = jnp.where(ends_b, token_b, y_b)
        if j < depth:
            nxt_b = jnp.argmax(acc_bw, axis=1).astype(jnp.int32)
            path_bd = path_bd.at[:, j].set(jnp.where(step_b, nxt_b, 0))
            cur_b = jnp.where(step_b, nxt_b, cur_b)
            n_b = n_b + step_b
        alive_b = step_b
    return n_b, path_bd, cur_b, y_b
