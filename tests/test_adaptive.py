"""Adaptive mode: drafts kept while confident; tau = 0 is fast, tau > 1 is slow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_decode_engine import NO_STOP, PROMPTS, S, _ids, _system, _trained

from mtp.config import ConfigError, DrafterConfig
from mtp.decode.engine import Decoder
from mtp.decode.modes import Adaptive, Think
from mtp.decode.sampling import Sampling
from mtp.decode.thinking import think_then_answer
from mtp.model.system import MTPSystem

N_NEW = 36


def _same(a, b):
    assert a.lengths.tolist() == b.lengths.tolist()
    for i in range(len(a.lengths)):
        np.testing.assert_array_equal(a.row(i), b.row(i))
    np.testing.assert_array_equal(a.passes, b.passes)


def _gen(dec, mode, **kw):
    return dec.generate(_ids(PROMPTS), mode=mode, max_new_tokens=N_NEW, stop_id=NO_STOP, **kw)


def test_tau_zero_is_fast_and_tau_above_one_is_slow():
    dec = Decoder(_trained("transformer"), S)
    _same(_gen(dec, Adaptive(tau=0.0)), _gen(dec, "fast"))
    _same(_gen(dec, Adaptive(tau=1.01, confidence="margin")), _gen(dec, "slow"))
    # inside a thought within a budget of passes: adaptive thought, slow answer
    heads = [np.asarray(p) for p in _ids(["<bos>q<think>", "<bos>p<think>"])]
    a = think_then_answer(dec, heads, thought_mode=Adaptive(tau=1.01), think_budget=6)
    r = think_then_answer(dec, heads, thought_mode="slow", think_budget=6)
    _same(a.thought, r.thought)
    _same(a.answer, r.answer)
    # and the think mode with an adaptive thought
    prompts = _ids(["<bos>q<think>the", "<bos>p"])
    got = dec.generate(prompts, mode=Think(Adaptive(tau=0.0)), max_new_tokens=30)
    _same(got, dec.generate(prompts, mode="think", max_new_tokens=30))


def _passes(res, b):
    """(start index, tokens) of each pass of row b, in order."""
    row_pass = res.pass_id[b, : res.lengths[b]]
    starts = np.flatnonzero(np.diff(np.concatenate([[-1], row_pass])) != 0)
    sizes = np.diff(np.concatenate([starts, [row_pass.size]]))
    return list(zip(starts.tolist(), sizes.tolist(), strict=True))


@pytest.mark.parametrize("confidence", ["prob", "margin"])
def test_keeps_drafts_while_confident_and_stops_at_the_first_below_tau(confidence):
    """Each pass's drafts, re-scored by the teacher-forced drafter at the pass's position:
    the kept ones reach tau, the first dropped one does not."""
    system, tau = _trained("transformer"), 0.9
    res = _gen(Decoder(system, S), Adaptive(tau=tau, confidence=confidence))
    prompts = _ids(PROMPTS)
    seqs = [np.concatenate([p, res.row(b)]) for b, p in enumerate(prompts)]
    width = max(q.size for q in seqs)
    padded = np.stack([np.pad(q, (0, width - q.size), constant_values=S.pad) for q in seqs])
    _, draft_btkv = system(jnp.asarray(padded))  # causal: the padding changes nothing used
    p_btkv = np.asarray(jax.nn.softmax(draft_btkv, -1))
    top2_btk = np.sort(p_btkv, -1)[..., -2:]
    conf_btk = top2_btk[..., 1] - top2_btk[..., 0] if confidence == "margin" else top2_btk[..., 1]
    k, sizes, checked = system.k, [], 0
    for b, prompt in enumerate(prompts):
        passes = _passes(res, b)
        for (i, n), (nxt, _) in zip(passes[:-1], passes[1:], strict=True):
            assert res.offset[b, i] == 0 and 1 <= n <= k + 1 and nxt == i + n
            t = len(prompt) + i - 1  # the taps position the drafts were drafted from
            kept = n - 1
            # kept drafts equal the greedy drafts, so the teacher-forced draft at (t, j) is the
            # decode's up to the first dropped draft
            np.testing.assert_array_equal(
                p_btkv[b, t, :kept].argmax(-1), seqs[b][t + 2 : t + 2 + kept]
            )
            margin = np.abs(conf_btk[b, t, : min(kept + 1, k)] - tau) > 1e-4
            if margin.all():
                assert (conf_btk[b, t, :kept] >= tau).all()
                if kept < k:
                    assert conf_btk[b, t, kept] < tau
                checked += 1
            sizes.append(n)
    assert checked > 0.9 * len(sizes)
    hist = res.stats["tokens_per_pass_hist"]
    assert sum(hist.values()) == res.passes.sum()  # one count per pass, the prefill included
    assert len(set(sizes)) >= 3, sizes  # the threshold cut passes at several lengths
    assert max(hist) <= k + 1


def _emission_system(bias, urgency_weight=0.0):
    """The trained system with a keep head: logit = bias + urgency_weight * urgency."""
    trained = _trained("transformer")
    cfg = DrafterConfig(kind="transformer", k=4, n_heads=4, emission=True)
    system = MTPSystem(trained.main.cfg, cfg, pad_id=S.pad, rngs=nnx.Rngs(0))
    nnx.update(system, nnx.state(trained))
    kernel = np.zeros(system.drafter.keep.kernel.shape, np.float32)
    kernel[-1] = urgency_weight  # the urgency input is the last feature
    system.drafter.keep.kernel.set_value(jnp.asarray(kernel))
    system.drafter.keep.bias.set_value(jnp.full((1,), bias, jnp.float32))
    return system


def test_learned_emission_follows_the_keep_head_and_the_urgency():
    learned = Adaptive(tau=0.5, confidence="learned")
    dec = Decoder(_trained("transformer"), S)
    fast, slow = _gen(dec, "fast"), _gen(dec, "slow")
    _same(_gen(Decoder(_emission_system(10.0), S), learned), fast)
    _same(_gen(Decoder(_emission_system(-10.0), S), learned), slow)
    urgent = Decoder(_emission_system(10.0, urgency_weight=-20.0), S)
    _same(_gen(urgent, learned, urgency_b=0.0), fast)
    _same(_gen(urgent, learned, urgency_b=1.0), slow)
    # the threshold can follow the urgency instead
    follow = Adaptive(tau=0.0, tau_urgent=1.01)
    _same(_gen(dec, follow, urgency_b=0.0), fast)
    _same(_gen(dec, follow, urgency_b=1.0), slow)
    with pytest.raises(ConfigError, match="drafter.emission"):
        _gen(dec, learned)


def test_sampled_decisions_mark_where_the_policy_stopped_its_pass():
    """p(keep) = 0.5 per draft: passes of every length, each one's last token marked as a
    stop decision exactly when the pass is shorter than 1 + k."""
    system = _emission_system(0.0)
    res = _gen(Decoder(system, S), Adaptive(confidence="learned", sample=True), seed=3)
    k, sizes = system.k, []
    for b in range(len(PROMPTS)):
        passes = _passes(res, b)
        for i, n in passes[:-1]:
            stops = res.choice[b, i : i + n]
            assert stops[:-1].sum() == 0 and stops[-1] == (n < k + 1)
            sizes.append(n)
    counts = np.bincount(sizes, minlength=k + 2)[1:]
    assert (counts > 0).all(), counts  # 1..1+k tokens per pass all occur
    # geometric: P(n = 1) = 1/2, about half the passes stop at once
    assert 0.35 < counts[0] / counts.sum() < 0.65, counts


def test_bad_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="confidence"):
        Adaptive(confidence="entropy")
    with pytest.raises(ConfigError, match="tau"):
        Adaptive(tau=-0.1)
    with pytest.raises(ConfigError, match="sample"):
        Adaptive(sample=True)


def test_sampled_tokens_stay_inside_one_compile():
    dec = Decoder(_system("transformer", seed=2), S)
    a = _gen(dec, Adaptive(tau=0.3), sampling=Sampling(temperature=1.0), seed=1)
    b = _gen(dec, Adaptive(tau=0.3), sampling=Sampling(temperature=1.0), seed=1)
    _same(a, b)
    assert not b.compiled
