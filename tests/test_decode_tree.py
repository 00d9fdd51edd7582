"""Speculative decoding with dynamic draft trees: the tree pass, the node selection, the
verification rules against exact distributions, and end to end against slow decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from mtp.config import ConfigError, DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode import tree
from mtp.decode.engine import Decoder
from mtp.decode.modes import Speculative
from mtp.decode.sampling import Sampling, log_probs
from mtp.model.system import MTPSystem
from mtp.model.transformer import FedTree, Transformer, move_slots

SPECIALS = ByteTokenizer().specials
TINY = ModelConfig(vocab_size=7, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=40)


def test_a_tree_pass_scores_each_node_as_a_forward_over_its_path():
    """One cached pass over [root, nodes] gives each node the logits of a plain forward over
    prompt + its root-to-node path: RoPE by depth, attention to its ancestors only."""
    model = Transformer(TINY, rngs=nnx.Rngs(1))
    prompt = jnp.array([[1, 3, 5]])
    feed = jnp.array([[2, 4, 6, 0, 1, 5]])
    parent = jnp.array([[-1, 0, 0, 1, 1, 3]])  # root 2; 4, 6 under it; 0, 1 under 4; 5 under 0
    depth = jnp.array([[0, 1, 1, 2, 2, 3]])
    _, _, cache = model(prompt, jnp.arange(3)[None], model.init_cache(1))
    fed = FedTree(depth, tree.ancestors(parent, 3))
    logits, _, _ = model(feed, 3 + jnp.arange(6)[None], cache, tree=fed)
    for i in range(6):
        path, j = [], i
        while j >= 0:
            path.insert(0, int(feed[0, j]))
            j = int(parent[0, j])
        want = model(jnp.concatenate([prompt, jnp.array([path])], 1))[0][0, -1]
        np.testing.assert_allclose(logits[0, i], want, atol=1e-5, err_msg=f"node {i}")
    # accept root -> 4 -> 0 -> 5 (feed 1, 3, 5): moved to positions 4..6, the next token at 7
    _, _, cache = model(feed, 3 + jnp.arange(6)[None], cache, tree=fed)
    cache = move_slots(cache, jnp.array([[4, 6, 8]]), jnp.array([[4, 5, 6]]))
    nxt, _, _ = model(jnp.array([[3]]), jnp.array([[7]]), cache)
    want = model(jnp.array([[1, 3, 5, 2, 4, 0, 5, 3]]))[0][0, -1]
    np.testing.assert_allclose(nxt[0, 0], want, atol=1e-5)


def test_select_nodes_keeps_the_likeliest_paths_as_a_tree():
    rng = np.random.default_rng(0)
    b, d, m, n = 3, 3, 2, 4
    tok = jnp.asarray(rng.integers(0, 50, (b, d, m)), jnp.int32)
    parent = jnp.asarray(rng.integers(0, m, (b, d, m)), jnp.int32).at[:, 0].set(0)
    step_lp = -rng.exponential(1.0, (b, d, m))
    lp = np.zeros((b, d, m))
    lp[:, 0] = step_lp[:, 0]
    for j in range(1, d):  # a path's log-prob: its parent's plus its own step's
        lp[:, j] = np.take_along_axis(lp[:, j - 1], np.asarray(parent[:, j]), 1) + step_lp[:, j]
    tok_bn, parent_bn, depth_bn = tree.select_nodes(tok, jnp.asarray(lp), parent, n)
    for r in range(b):
        best = np.argsort(-lp[r].reshape(-1), kind="stable")[:n]  # candidates c = j * m + beam
        assert tok_bn[r].tolist() == np.asarray(tok[r]).reshape(-1)[best].tolist()
        assert depth_bn[r].tolist() == (1 + best // m).tolist()
        for i, c in enumerate(best):
            par = (c // m - 1) * m + int(parent[r, c // m, c % m])  # the parent's candidate
            want = 0 if c < m else 1 + best.tolist().index(par)
            assert parent_bn[r, i] == want and want <= i  # the parent is fed before the child


def test_tree_options_are_checked():
    with pytest.raises(ConfigError, match="tree_beams >= 1"):
        Speculative(tree_nodes=4, tree_beams=0)
    with pytest.raises(ConfigError, match="at most tree_depth x tree_beams = 6"):
        Speculative(tree_nodes=7, tree_beams=2).depth(3)
    with pytest.raises(ConfigError, match="exceeds the drafter's k=3"):
        Speculative(tree_nodes=2, tree_depth=4).depth(3)


# A fixed tree over 5 tokens; the main distribution at a node depends on its depth only, so
# the token emitted at place j must be distributed as P[j] whatever the tree held.
SAMPLING = Sampling(temperature=0.8, top_k=4, top_p=0.9)
LOGITS_P = np.array([[2.0, 1.4, 1.0, 0.2, -1.0], [0.0, 0.3, 1.5, 1.2, -0.5],
                     [1.0, 1.0, 0.9, 0.8, 0.7]])  # fmt: skip
P = np.exp(np.asarray(log_probs(jnp.asarray(LOGITS_P), SAMPLING), np.float64))
FEED = np.array([3, 0, 1, 4, 2, 3, 4])  # root 3; 0, 1, 4 under it; 2, 3 under 0; 4 under 1
PARENT = np.array([-1, 0, 0, 0, 1, 1, 2])
DEPTH = np.array([0, 1, 1, 1, 2, 2, 2])
N_SAMPLES = 100_000


def _walks(seed=0):
    """Tokens each of N_SAMPLES verifications emits, (N, 3), -1 where it emitted none."""
    n = N_SAMPLES
    logits = jnp.broadcast_to(jnp.asarray(LOGITS_P)[DEPTH], (n, len(FEED), 5))
    feed, parent = jnp.broadcast_to(FEED, (n, len(FEED))), jnp.broadcast_to(PARENT, (n, len(FEED)))
    verify = jax.jit(lambda lg, k: tree.verify_tree(lg, feed, parent, 2, SAMPLING, k))
    acc, path, _, y = verify(logits, jax.random.key(seed))
    toks = np.take_along_axis(np.asarray(feed), np.asarray(path), 1)
    j = np.arange(3)
    acc = np.asarray(acc)[:, None]
    ext = np.concatenate([toks, np.zeros((n, 1), int)], 1)
    return np.where(j < acc, ext, np.where(j == acc, np.asarray(y)[:, None], -1))


def _misfit(out) -> float:
    """Smallest chi-square p-value of: the token at place j ~ P[j], given place j was reached."""
    pvals = []
    for j in range(P.shape[0]):
        x = out[:, j][out[:, j] >= 0]
        counts = np.bincount(x, minlength=5)
        if counts[P[j] == 0].any():
            return 0.0
        keep = P[j] > 0
        pvals.append(stats.chisquare(counts[keep], P[j, keep] / P[j].sum() * len(x)).pvalue)
    return min(pvals)


def _reach(out):
    """P(depth 1 accepted), P(depth 2 accepted): the verified children's main mass."""
    kids = lambda i: FEED[PARENT == i]
    want1 = P[0][kids(0)].sum()
    want2 = sum(P[0][FEED[i]] * P[1][kids(i)].sum() for i in np.flatnonzero(PARENT == 0))
    got = [(np.isin(out[:, 0], kids(0)) & (out[:, 1] >= 0)).mean(), (out[:, 2] >= 0).mean()]
    return np.array(got), np.array([want1, want2])


def test_tree_sampling_emits_tokens_distributed_as_the_main_model():
    out = _walks()
    assert (out[:, 2] >= 0).mean() > 0.2  # the deepest place is reached and tested
    assert _misfit(out) > 1e-3
    got, want = _reach(out)
    np.testing.assert_allclose(got, want, atol=0.01)  # a child is accepted w.p. its main mass


def _no_renormalisation(logp_bv, tok_bw, kids_bw, key_u, key_r):
    p_bv = jnp.exp(logp_bv)
    px_bw = jnp.where(kids_bw, jnp.take_along_axis(p_bv, tok_bw, axis=1), 0.0)
    acc_bw = kids_bw & (jax.random.uniform(key_u, tok_bw.shape) < px_bw)
    _, token_b = RIGHT_STEP(logp_bv, tok_bw, kids_bw, key_u, key_r)
    return acc_bw, token_b


def _residual_keeps_the_children(logp_bv, tok_bw, kids_bw, key_u, key_r):
    acc_bw, _ = RIGHT_STEP(logp_bv, tok_bw, kids_bw, key_u, key_r)
    return acc_bw, jax.random.categorical(key_r, logp_bv, axis=-1).astype(jnp.int32)


RIGHT_STEP = tree.sampled_step


@pytest.mark.parametrize("wrong", [_no_renormalisation, _residual_keeps_the_children])
def test_the_tree_sampling_checks_reject_a_wrong_rule(wrong, monkeypatch):
    monkeypatch.setattr(tree, "sampled_step", wrong)
    out = _walks()
    got, want = _reach(out)
    assert _misfit(out) < 1e-12 or np.abs(got - want).max() > 0.05


# End to end on a tiny system; its random drafter's beams cover much of the 7 tokens, so
# trees accept often and the accepted paths move in the cache.
def _system(**drafter):
    cfg = DrafterConfig(k=3, n_heads=4, **drafter)
    ids = np.array([0, 2, 3, 5]) if drafter.get("draft_vocab") else None
    return MTPSystem(TINY, cfg, pad_id=0, draft_ids=ids, rngs=nnx.Rngs(0))


TREES = [
    Speculative(tree_nodes=6, tree_beams=3, max_batch=0),
    Speculative(tree_nodes=4, tree_beams=2, tree_depth=2, max_batch=0),
    Speculative(tree_nodes=9, tree_beams=4, max_batch=0),
]  # fmt: skip  (max_batch 0: speculative at any batch size)


@pytest.mark.parametrize(
    "mode, drafter",
    [
        (TREES[0], {}),
        (TREES[1], {}),
        (TREES[2], {"draft_vocab": 4, "head": "shared"}),
        (TREES[0], {"context": True}),
    ],
    ids=["n6b3", "n4b2d2", "n9b4-trimmed", "n6b3-context"],
)
def test_tree_greedy_equals_slow(mode, drafter):
    dec = Decoder(_system(**drafter), SPECIALS)
    prompts = [np.array([1, 3]), np.array([4, 0, 2, 5, 6]), np.array([2]), np.array([6, 6]),
               np.array([5, 1, 0]), np.array([3, 2, 1, 4])]  # fmt: skip
    kw = dict(max_new_tokens=26, stop_id=-1)
    slow, spec = dec.generate(prompts, mode="slow", **kw), dec.generate(prompts, mode=mode, **kw)
    np.testing.assert_array_equal(spec.tokens, slow.tokens)
    assert spec.stats["mean_accepted"] > 0.1  # paths are accepted (and moved in the cache)


def test_a_one_beam_tree_is_the_chain():
    dec = Decoder(_system(), SPECIALS)
    prompts = [np.array([1, 3]), np.array([4, 0, 2])]
    kw = dict(max_new_tokens=16, stop_id=-1)
    chain = dec.generate(prompts, mode="speculative", **kw)
    one = dec.generate(prompts, mode=Speculative(tree_nodes=3, tree_beams=1), **kw)
    np.testing.assert_array_equal(one.accept_hist, chain.accept_hist)
    np.testing.assert_array_equal(one.offset, chain.offset)


def test_tree_sampling_end_to_end_is_distributed_as_slow():
    """The joint law of the first 4 tokens, tree speculative against slow sampling."""
    dec = Decoder(_system(draft_vocab=4, head="shared"), SPECIALS)
    samples, rows, new = {}, 6000, 4
    for mode in ("slow", TREES[0]):
        res = dec.generate([np.array([1, 3])] * rows, mode=mode, max_new_tokens=new,
                           sampling=SAMPLING, seed=5, stop_id=-1)  # fmt: skip
        samples[str(mode)] = np.ravel_multi_index(res.tokens[:, :new].T, (7,) * new)
        if mode != "slow":
            assert (res.offset[:, 1:new] > 0).mean() > 0.2  # drafts accepted often
    table = np.stack([np.bincount(s, minlength=7**new) for s in samples.values()])
    table = table[:, table.sum(0) > 0]
    assert stats.chi2_contingency(table).pvalue > 1e-3


def test_a_tree_needs_cache_room_for_its_slots():
    dec = Decoder(_system(), SPECIALS)
    with pytest.raises(Exception, match=r"\+ up to 5 tree slots .* allowed: max_new_tokens <= 33"):
        dec.generate([np.array([1, 3])], mode=Speculative(tree_nodes=6, tree_beams=3),
                     max_new_tokens=34)  # fmt: skip
