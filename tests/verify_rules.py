"""Speculative-sampling acceptance rules, right and wrong, for the tests' negative controls.

`rule()` rebuilds `mtp.decode.speculative.verify_sampled` (same signature, same
use of the key) from swappable parts, so each wrong rule differs from the right
one in exactly one part: how a draft is accepted, what a rejection resamples
from, or where the bonus token comes from.
"""

import jax
import jax.numpy as jnp


def rule(accept, residual=lambda p, q: jnp.maximum(p - q, 0.0), bonus_place_shift=0):
    """A verify rule: draft d_j is kept with probability accept(p(d_j), q(d_j)); the token
    after the first rejection is drawn from norm(residual(p, q)) at that place; after k
    acceptances from p at place k - bonus_place_shift (the right place: k, q = 0 there)."""

    def verify(logp_bwv, logq_bkv, drafts_bk, key):
        b, k = drafts_bk.shape
        key_u, key_r = jax.random.split(key)
        p_bwv, q_bkv = jnp.exp(logp_bwv), jnp.exp(logq_bkv)
        p_d_bk = jnp.take_along_axis(p_bwv[:, :k], drafts_bk[..., None], axis=-1)[..., 0]
        q_d_bk = jnp.take_along_axis(q_bkv, drafts_bk[..., None], axis=-1)[..., 0]
        ok_bk = jax.random.uniform(key_u, (b, k)) < accept(p_d_bk, q_d_bk)
        n_b = jnp.sum(jnp.cumprod(ok_bk.astype(jnp.int32), axis=1), axis=1)
        place_b = jnp.where(n_b == k, k - bonus_place_shift, n_b)
        q_ext_bwv = jnp.concatenate([q_bkv, jnp.zeros_like(q_bkv[:, :1])], axis=1)
        p_bv = jnp.take_along_axis(p_bwv, place_b[:, None, None], axis=1)[:, 0]
        q_bv = jnp.take_along_axis(q_ext_bwv, n_b[:, None, None], axis=1)[:, 0]
        r_bv = residual(p_bv, q_bv)
        r_bv = jnp.where(jnp.sum(r_bv, -1, keepdims=True) > 0, r_bv, p_bv)
        return n_b, jax.random.categorical(key_r, jnp.log(r_bv), axis=-1).astype(jnp.int32)

    return verify


RIGHT = rule(lambda p, q: jnp.minimum(1.0, p / q))

# name -> a rule that leaves the output distributed unlike the main model
WRONG = {
    "accept min(1, q/p)": rule(lambda p, q: jnp.minimum(1.0, q / p)),
    "accept always": rule(lambda p, q: jnp.ones_like(p)),
    "accept with p(d), not p(d)/q(d)": rule(lambda p, q: p),
    "resample from p, not p - q": rule(lambda p, q: jnp.minimum(1.0, p / q), lambda p, q: p),
    "bonus from place k - 1": rule(lambda p, q: jnp.minimum(1.0, p / q), bonus_place_shift=1),
}
ACCEPTANCE = ("accept min(1, q/p)", "accept always", "accept with p(d), not p(d)/q(d)")
