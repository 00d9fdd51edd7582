"""Sampling settings and the speculative acceptance rule, against exact distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mtp.config import UserError
from mtp.decode.sampling import Sampling, choose, log_probs
from mtp.decode.speculative import verify_greedy, verify_sampled

# Main (p, k + 1 places) and drafter (q, k offsets) distributions over 4 tokens, far apart.
P = np.array([[0.6, 0.2, 0.1, 0.1], [0.05, 0.05, 0.3, 0.6], [0.25, 0.25, 0.25, 0.25]])
Q = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
N_SAMPLES = 100_000


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    kept = lambda s: np.isfinite(np.asarray(log_probs(logits, s)))[0].tolist()
    assert kept(Sampling(temperature=1.0)) == [True] * 4
    assert kept(Sampling(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(Sampling(temperature=1.0, top_p=0.7)) == [True, True, False, False]
    assert kept(Sampling(temperature=1.0, top_p=0.76)) == [True, True, True, False]
    assert kept(Sampling(temperature=1.0, top_p=0.1)) == [True, False, False, False]
    lp = log_probs(logits, Sampling(temperature=1.0, top_k=2))
    np.testing.assert_allclose(np.exp(lp[0, :2]), [2 / 3, 1 / 3], rtol=1e-6)
    greedy = choose(jnp.array([[0.0, 3.0, 1.0]]), Sampling(), jax.random.key(0))
    assert greedy.tolist() == [1]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0)])
def test_bad_sampling_settings_raise_a_user_error(bad):
    with pytest.raises(UserError, match="sampling"):
        Sampling(**bad)


def test_verify_greedy_accepts_the_matching_prefix_and_adds_the_main_token():
    # main argmax at the k + 1 = 4 places: 1, 2, 3, 0
    logits = jax.nn.one_hot(jnp.array([[1, 2, 3, 0]] * 3), 5)
    drafts = jnp.array([[1, 2, 3], [1, 0, 3], [4, 2, 3]])
    n, tok = verify_greedy(logits, drafts)
    assert n.tolist() == [3, 1, 0]
    assert tok.tolist() == [0, 2, 1]  # bonus after 3 accepted; corrections otherwise


def _wrong_resample_from_p(logp, logq, drafts, key):
    """A plausible but wrong rule: on rejection draw from p instead of norm(max(0, p - q))."""
    key_u, key_r = jax.random.split(key)
    b, k = drafts.shape
    p, q = jnp.exp(logp), jnp.exp(logq)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], -1)[..., 0]
    q_d = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    ok = jax.random.uniform(key_u, (b, k)) * q_d < p_d
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), 1), 1)
    p_n = jnp.take_along_axis(p, n[:, None, None], 1)[:, 0]
    return n, jax.random.categorical(key_r, jnp.log(p_n), -1).astype(jnp.int32)


def _emitted(rule, seed=0):
    """Tokens a verify pass emits, (N, k + 1), -1 where it emitted none."""
    kd, kv = jax.random.split(jax.random.key(seed))
    k = Q.shape[0]
    logp = jnp.broadcast_to(jnp.log(P), (N_SAMPLES, *P.shape))
    logq = jnp.broadcast_to(jnp.log(Q), (N_SAMPLES, *Q.shape))
    drafts = jax.random.categorical(kd, logq, axis=-1)  # (N, k) drawn from q
    n, tok = jax.jit(rule)(logp, logq, drafts, kv)
    j = jnp.arange(k + 1)
    ext = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], 1)
    out = jnp.where(j < n[:, None], ext, jnp.where(j == n[:, None], tok[:, None], -1))
    return np.asarray(out)


def _misfit(out) -> float:
    """Smallest chi-square p-value of: token j of a pass ~ P[j], given the pass reached j.

    The main distribution at place j does not depend on the drafts here, so
    whatever the drafts did before, the token emitted at place j must be
    distributed as P[j] — exactly what slow sampling would draw.
    """
    pvals = []
    for j in range(P.shape[0]):
        x = out[:, j][out[:, j] >= 0]
        counts = np.bincount(x, minlength=P.shape[1])
        pvals.append(stats.chisquare(counts, P[j] * len(x)).pvalue)
    return min(pvals)


def test_verify_sampled_emits_tokens_distributed_as_the_main_model():
    out = _emitted(verify_sampled)
    assert (out[:, 0] >= 0).all()
    assert (out[:, -1] >= 0).sum() > 1000  # the bonus place is reached and tested
    assert _misfit(out) > 1e-3


def test_the_same_check_rejects_a_wrong_acceptance_rule():
    assert _misfit(_emitted(_wrong_resample_from_p)) < 1e-12


def test_verify_sampled_acceptance_rate_is_the_overlap_of_p_and_q():
    """P(d_1 accepted) = sum_x min(p_0, q_0) (Leviathan et al. 2023, Thm 3.5)."""
    out = _emitted(verify_sampled, seed=1)
    # d_1 was accepted iff place 1 was reached
    rate = (out[:, 1] >= 0).mean()
    assert abs(rate - np.minimum(P[0], Q[0]).sum()) < 0.01
