"""Sampling settings and the speculative acceptance rule, against exact distributions; a
trimmed draft vocabulary keeps decoding lossless."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import verify_rules
from flax import nnx
from scipy import stats

from mtp.config import DrafterConfig, ModelConfig, UserError
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.decode.modes import Speculative
from mtp.decode.sampling import Sampling, choose, log_probs
from mtp.decode.speculative import verify_greedy, verify_sampled
from mtp.model.system import MTPSystem, to_full_vocab

TOK_SPECIALS = ByteTokenizer().specials

# Raw main (k + 1 = 4 places) and drafter (k = 3 offsets) logits over 5 tokens. Processed
# by SAMPLING, each keeps 3 or 4 tokens, and p and q keep different ones, so every draft
# offset, the bonus place, and tokens only one side can emit are all exercised.
SAMPLING = Sampling(temperature=0.8, top_k=4, top_p=0.9)
LOGITS_P = np.array([[2.0, 1.4, 1.0, 0.2, -1.0], [0.0, 0.3, 1.5, 1.2, -0.5],
                     [1.0, 1.0, 0.9, 0.8, 0.7], [-1.0, 0.5, 0.0, 1.5, 1.4]])  # fmt: skip
LOGITS_Q = np.array([[1.6, 1.6, 0.4, 1.0, 0.0], [0.5, 0.0, 1.7, 0.6, 1.0],
                     [1.2, 0.6, 1.0, -0.5, 1.1]])  # fmt: skip
LOGP = log_probs(jnp.asarray(LOGITS_P), SAMPLING)
LOGQ = log_probs(jnp.asarray(LOGITS_Q), SAMPLING)
P, Q = np.exp(np.asarray(LOGP, np.float64)), np.exp(np.asarray(LOGQ, np.float64))
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


def _emitted(rule, seed=0):
    """Tokens a verify pass emits, (N, k + 1), -1 where it emitted none."""
    kd, kv = jax.random.split(jax.random.key(seed))
    k = Q.shape[0]
    logp = jnp.broadcast_to(LOGP, (N_SAMPLES, *P.shape))
    logq = jnp.broadcast_to(LOGQ, (N_SAMPLES, *Q.shape))
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
    distributed as P[j] — exactly what slow sampling would draw. A token P[j]
    gives no mass to is a misfit outright.
    """
    pvals = []
    for j in range(P.shape[0]):
        x = out[:, j][out[:, j] >= 0]
        counts = np.bincount(x, minlength=P.shape[1])
        if counts[P[j] == 0].any():
            return 0.0
        keep = P[j] > 0
        pvals.append(stats.chisquare(counts[keep], P[j, keep] / P[j].sum() * len(x)).pvalue)
    return min(pvals)


def test_verify_sampled_emits_tokens_distributed_as_the_main_model():
    out = _emitted(verify_sampled)
    assert (out[:, 0] >= 0).all()
    assert (out[:, -1] >= 0).sum() > 0.2 * N_SAMPLES  # the bonus place is reached and tested
    assert _misfit(out) > 1e-3


def test_the_rebuilt_rule_is_verify_sampled():
    """The negative controls below change one part of this rebuild, which matches exactly."""
    np.testing.assert_array_equal(_emitted(verify_rules.RIGHT), _emitted(verify_sampled))


@pytest.mark.parametrize("wrong", verify_rules.WRONG)
def test_the_same_check_rejects_a_wrong_rule(wrong):
    assert _misfit(_emitted(verify_rules.WRONG[wrong])) < 1e-12


def _reach_rates(out):
    """Share of passes that accepted drafts 1..j, j = 1..k (place j reached)."""
    return (out[:, 1:] >= 0).mean(0)


def test_verify_sampled_acceptance_rate_is_the_overlap_of_p_and_q():
    """P(d_j accepted | d_1..d_{j-1} were) = sum_x min(p_j, q_j) (Leviathan et al. 2023,
    Thm 3.5); here the places are independent, so P(place j reached) is their product."""
    want = np.cumprod(np.minimum(P[:-1], Q).sum(-1))
    np.testing.assert_allclose(_reach_rates(_emitted(verify_sampled, seed=1)), want, atol=0.01)


@pytest.mark.parametrize("wrong", verify_rules.ACCEPTANCE)
def test_the_acceptance_rate_check_rejects_a_wrong_acceptance_rule(wrong):
    want = np.cumprod(np.minimum(P[:-1], Q).sum(-1))
    got = _reach_rates(_emitted(verify_rules.WRONG[wrong], seed=1))
    assert np.abs(got - want).max() > 0.05


# A trimmed draft vocabulary: the drafter's q lives on U < V tokens, laid over the full
# vocabulary with zeros elsewhere (`to_full_vocab`), as the decoding modes do.
DRAFT_IDS = jnp.array([0, 2, 3])
LOGQ_TRIMMED = to_full_vocab(
    log_probs(jnp.asarray(LOGITS_Q)[:, DRAFT_IDS], SAMPLING), DRAFT_IDS, 5, -jnp.inf
)


def test_verify_sampled_with_a_trimmed_draft_vocabulary_keeps_the_main_law():
    kd, kv = jax.random.split(jax.random.key(3))
    logp = jnp.broadcast_to(LOGP, (N_SAMPLES, *P.shape))
    logq = jnp.broadcast_to(LOGQ_TRIMMED, (N_SAMPLES, *Q.shape))
    drafts = jax.random.categorical(kd, logq, axis=-1)
    assert set(np.unique(np.asarray(drafts))) <= {0, 2, 3}
    n, tok = jax.jit(verify_sampled)(logp, logq, drafts, kv)
    j = jnp.arange(Q.shape[0] + 1)
    ext = jnp.concatenate([drafts, jnp.zeros_like(drafts[:, :1])], 1)
    out = np.asarray(jnp.where(j < n[:, None], ext, jnp.where(j == n[:, None], tok[:, None], -1)))
    assert (out[:, -1] >= 0).sum() > 0.05 * N_SAMPLES
    assert _misfit(out) > 1e-3


# End to end: a tiny system whose drafter scores 3 of 5 tokens, decoding greedy and sampled.
TINY = ModelConfig(vocab_size=5, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=16)
PROMPT, N_NEW, ROWS = np.array([1, 3]), 4, 6000


def _trimmed_system(head="own"):
    cfg = DrafterConfig(k=3, n_heads=4, head=head, draft_vocab=3)
    return MTPSystem(TINY, cfg, pad_id=0, draft_ids=np.asarray(DRAFT_IDS), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("head", ["own", "shared"])
def test_speculative_greedy_equals_slow_with_a_trimmed_draft_vocabulary(head):
    dec = Decoder(_trimmed_system(head), TOK_SPECIALS)
    prompts = [PROMPT, np.array([4, 0, 2]), np.array([2])]
    kw = dict(max_new_tokens=10, stop_id=-1)
    slow, spec = (
        dec.generate(prompts, mode="slow", **kw),
        dec.generate(prompts, mode="speculative", **kw),
    )
    np.testing.assert_array_equal(spec.tokens, slow.tokens)
    drafted = spec.tokens[spec.offset > 0]
    assert len(drafted) and set(np.unique(drafted)) <= {0, 2, 3}  # accepted drafts: full ids


def test_speculative_sampling_with_a_trimmed_draft_vocabulary_is_distributed_as_slow():
    """The joint law of the first N_NEW tokens, speculative against slow sampling."""
    dec = Decoder(_trimmed_system(), TOK_SPECIALS)
    samples = {}
    for mode in ("slow", Speculative(max_batch=0)):  # speculates at ROWS rows too
        res = dec.generate([PROMPT] * ROWS, mode=mode, max_new_tokens=N_NEW, sampling=SAMPLING,
                           seed=11, stop_id=-1)  # fmt: skip
        samples[res.mode] = np.ravel_multi_index(res.tokens[:, :N_NEW].T, (5,) * N_NEW)
        if mode != "slow":
            assert (res.offset[:, 1:N_NEW] > 0).mean() > 0.2  # drafts accepted often
    table = np.stack([np.bincount(s, minlength=5**N_NEW) for s in samples.values()])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3
