"""Draft verification: which drafts the main model accepts, and the token it adds.

A verify pass feeds [y0, d_1..d_k] and gets main logits at all k + 1 places;
index j scores the token after d_j (after y0 for j = 0), so it verifies
d_{j+1}. Greedy keeps the longest prefix of drafts equal to the main argmax
and appends the main argmax after it (a correction, or the bonus token when
every draft is accepted): the output equals slow greedy token for token.
Sampling uses the rejection rule of Leviathan et al. 2023 (Alg. 1) / Chen et
al. 2023, which leaves the output distributed exactly as slow sampling.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _accepted(ok_bk: jax.Array) -> jax.Array:
    """Length of the leading run of accepted drafts, (B,) int32."""
    return jnp.sum(jnp.cumprod(ok_bk.astype(jnp.int32), axis=1), axis=1)


def verify_greedy(logits_bwv: jax.Array, drafts_bk: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Accepted count n (B,) in 0..k and the main token after them (B,)."""
    main_bw = jnp.argmax(logits_bwv, axis=-1).astype(jnp.int32)
    n_b = _accepted(drafts_bk == main_bw[:, :-1])
    return n_b, jnp.take_along_axis(main_bw, n_b[:, None], axis=1)[:, 0]


def verify_sampled(
    logp_bwv: jax.Array, logq_bkv: jax.Array, drafts_bk: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling (Leviathan et al. 2023, Alg. 1).

    logp_bwv: processed main log-probs at the k + 1 fed places; logq_bkv:
    processed drafter log-probs the drafts were sampled from. Draft d_j is
    accepted with probability min(1, p(d_j) / q(d_j)); at the first rejection
    the token is drawn from norm(max(0, p - q)); after k acceptances from p.
    Returns the accepted count n (B,) and that token (B,).
    """
    b, k = drafts_bk.shape
    key_u, key_r = jax.random.split(key)
    p_bwv, q_bkv = jnp.exp(logp_bwv), jnp.exp(logq_bkv)
    p_d_bk = jnp.take_along_axis(p_bwv[:, :k], drafts_bk[..., None], axis=-1)[..., 0]
    q_d_bk = jnp.take_along_axis(q_bkv, drafts_bk[..., None], axis=-1)[..., 0]
    u_bk = jax.random.uniform(key_u, (b, k))
    n_b = _accepted(u_bk * q_d_bk < p_d_bk)
    q_ext_bwv = jnp.concatenate([q_bkv, jnp.zeros_like(q_bkv[:, :1])], axis=1)  # q = 0: bonus
    p_bv = jnp.take_along_axis(p_bwv, n_b[:, None, None], axis=1)[:, 0]
    q_bv = jnp.take_along_axis(q_ext_bwv, n_b[:, None, None], axis=1)[:, 0]
    r_bv = jnp.maximum(p_bv - q_bv, 0.0)
    r_bv = jnp.where(jnp.sum(r_bv, -1, keepdims=True) > 0, r_bv, p_bv)  # p == q: never rejected
    return n_b, jax.random.categorical(key_r, jnp.log(r_bv), axis=-1).astype(jnp.int32)
