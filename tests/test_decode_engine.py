"""Decoding engine: speculative is lossless, fast feeds k + 1, think switches, one compile."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mtp.decode.engine as engine
import mtp.decode.passes as passes
from mtp.config import DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import TRACES, Decoder
from mtp.decode.sampling import Sampling, log_probs
from mtp.decode.speculative import verify_sampled
from mtp.model.system import MTPSystem, shifted

TOK = ByteTokenizer()
MAIN = ModelConfig(vocab_size=262, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=80)
KINDS = ["transformer", "medusa", "rnn"]
NO_EOS = -1  # an eos_id no token matches: rows run to their limit

# Three documents sharing prefixes, so a trained model is sure of most bytes, not all.
DOCS = [
    "<bos>q<think>the red fox jumps over the dog</think>yes<eos>",
    "<bos>q<think>the red dog sleeps under a log</think>no<eos>",
    "<bos>p<think>a blue cat sits on the mat</think>maybe<eos>",
]
PROMPTS = ["<bos>q", "<bos>p<think>a", "<bos>q<think>the red", "<bos>q<think>the red dog sl"]


def _ids(texts):
    return [TOK.encode_with_specials(t) for t in texts]


def _system(kind="transformer", k=4, seed=0, main=MAIN):
    return MTPSystem(
        main, DrafterConfig(kind=kind, k=k, n_heads=4), pad_id=256, rngs=nnx.Rngs(seed)
    )


def _with_k(system, kind, k):
    """The same weights with a drafter that drafts only its first k offsets (causal kinds)."""
    new = _system(kind, k)
    # medusa has one residual head per offset (w_kdd): keep the first k
    trim = lambda old, shape: old[: shape.shape[0]] if old.shape != shape.shape else old
    nnx.update(new, jax.tree.map(trim, nnx.state(system), nnx.state(new)))
    return new


def _train(system, steps=250, batch=16, seq=48):
    """A few hundred Adam steps of main + drafter cross-entropy on DOCS."""
    rng = np.random.default_rng(0)
    data = np.concatenate(_ids([DOCS[i] for i in rng.integers(0, len(DOCS), 300)]))
    starts = rng.integers(0, len(data) - seq, (steps, batch))
    batches = jnp.asarray(data[starts[..., None] + np.arange(seq)])  # (steps, B, T)
    graphdef, state = nnx.split(system)
    k, tx, ce = system.k, optax.adam(3e-3), optax.softmax_cross_entropy_with_integer_labels

    def loss(state, x_bt):
        logits_btv, draft_btkv = nnx.merge(graphdef, state)(x_bt)
        nxt_bt, tgt_btk = shifted(x_bt, 1, 0)[..., 0], shifted(x_bt, k, 0, start=2)
        t = x_bt.shape[1] - 1 - k  # positions whose k draft targets all exist
        return (
            ce(logits_btv[:, :t], nxt_bt[:, :t]).mean()
            + ce(draft_btkv[:, :t], tgt_btk[:, :t]).mean()
        )

    @jax.jit
    def run(state, batches):
        def step(carry, x_bt):
            state, opt = carry
            value, grads = jax.value_and_grad(loss)(state, x_bt)
            updates, opt = tx.update(grads, opt, state)
            return (optax.apply_updates(state, updates), opt), value

        (state, _), losses = jax.lax.scan(step, (state, tx.init(state)), batches)
        return state, losses

    state, losses = run(state, batches)
    assert losses[-10:].mean() < 0.5 * losses[:10].mean()
    nnx.update(system, state)
    return system


@functools.cache
def _trained(kind):
    return _train(_system(kind, k=4))


@functools.cache
def _slow_reference(kind, trained):
    """Slow greedy rows of PROMPTS; depends on the main model only, so shared by every k."""
    system = _trained(kind) if trained else _system(kind)
    return Decoder(system).generate(_ids(PROMPTS), mode="slow", max_new_tokens=40)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_speculative_greedy_equals_slow(kind, k):
    """Token for token, batched over ragged prompts, on random and on trained weights."""
    dec = Decoder(_with_k(_system(kind), kind, k))
    for trained in (False, True):
        if trained:
            dec.set_weights(_with_k(_trained(kind), kind, k))  # same compile, new weights
        slow = _slow_reference(kind, trained)
        spec = dec.generate(_ids(PROMPTS), mode="speculative", max_new_tokens=40)
        assert spec.lengths.tolist() == slow.lengths.tolist()
        for b in range(len(PROMPTS)):
            np.testing.assert_array_equal(spec.row(b), slow.row(b))
        st = spec.stats
        assert st["tokens_per_pass"] == pytest.approx(1 + st["mean_accepted"], rel=0.25)
        assert sum(st["accept_hist"]) == spec.passes.sum() - len(PROMPTS)  # prefill verifies none
        if trained:  # the test exercises accepted drafts and rows stopping at EOS
            assert st["mean_accepted"] > 0.5 * k, st
            stopped = [b for b in range(len(PROMPTS)) if slow.lengths[b] < 40]
            assert stopped and all(slow.row(b)[-1] == TOK.eos_id for b in stopped)


def test_batched_rows_equal_rows_decoded_alone():
    system = _trained("transformer")
    batch = Decoder(system).generate(_ids(PROMPTS), mode="speculative", max_new_tokens=24)
    for b, prompt in enumerate(PROMPTS):
        alone = Decoder(system).generate(_ids([prompt]), mode="speculative", max_new_tokens=24)
        np.testing.assert_array_equal(alone.row(0), batch.row(b))


@pytest.mark.parametrize("k", [1, 3])
def test_fast_emits_k_plus_1_tokens_per_pass_and_feeds_them_all(k):
    system = _system("transformer", k, seed=1)
    n_new = 4 * (k + 1)
    res = Decoder(system, eos_id=NO_EOS).generate(
        _ids(PROMPTS[:2]), mode="fast", max_new_tokens=n_new
    )
    assert res.lengths.tolist() == [n_new, n_new]
    assert res.passes.tolist() == [4, 4]
    assert res.stats["tokens_per_pass"] == k + 1
    np.testing.assert_array_equal(
        res.offset[:, :n_new], np.tile(np.arange(n_new) % (k + 1), (2, 1))
    )
    np.testing.assert_array_equal(
        res.pass_id[:, :n_new], np.tile(np.arange(n_new) // (k + 1), (2, 1))
    )
    # each pass's main token is the main model's argmax after every token before it,
    # drafts included: the pass fed all k + 1 tokens of the one before
    for b, prompt in enumerate(_ids(PROMPTS[:2])):
        seq = np.concatenate([prompt, res.row(b)])
        logits, _, _ = system.main(jnp.asarray(seq)[None])
        for i in range(0, n_new, k + 1):
            t = len(prompt) + i - 1  # the position whose next token is output i
            assert int(jnp.argmax(logits[0, t])) == res.row(b)[i]


def test_think_is_fast_inside_the_span_and_slow_after_it():
    system = _trained("transformer")
    dec = Decoder(system)
    res = dec.generate(_ids(["<bos>q", "<bos>p<think>a"]), mode="think", max_new_tokens=60)
    for b in range(2):
        toks, offs, passes = res.row(b), res.offset[b, : res.lengths[b]], res.pass_id[b]
        assert TOK.think_close_id in toks, TOK.decode(toks, False)  # the model closes its span
        close = int(np.flatnonzero(toks == TOK.think_close_id)[0])
        assert offs[close + 1 :].max(initial=0) == 0  # the answer: main tokens only
        assert len(set(passes[close + 1 : res.lengths[b]])) == res.lengths[b] - close - 1
        assert offs[: close + 1].max() >= 1  # drafts were kept in the span
        # and the answer is what slow decoding gives after the thinking text
        prefix = np.concatenate([_ids([["<bos>q", "<bos>p<think>a"][b]])[0], toks[: close + 1]])
        slow = dec.generate([prefix], mode="slow", max_new_tokens=60 - close - 1)
        np.testing.assert_array_equal(slow.row(0), toks[close + 1 :])
    assert res.stats["tokens_per_pass"] > 1.5
    # "<bos>q" is not thinking at first: the first pass emits "<think>" and keeps its drafts
    assert res.row(0)[0] == TOK.think_open_id and res.offset[0, 1] == 1


def test_think_without_a_span_is_slow():
    dec = Decoder(_system("transformer", 2, seed=3), eos_id=NO_EOS)
    prompts = _ids(["<bos>answer:", "<bos>x"])
    think = dec.generate(prompts, mode="think", max_new_tokens=20)
    slow = dec.generate(prompts, mode="slow", max_new_tokens=20)
    for b in range(2):
        if TOK.think_open_id not in slow.row(b):  # a random model might open one
            np.testing.assert_array_equal(think.row(b), slow.row(b))
            assert think.passes[b] == 20


def _exact_slow_distribution(system, prompt, n, sampling):
    """P(x_1..x_n | prompt) under slow sampling, by enumerating every continuation."""
    v = system.main.cfg.vocab_size
    seqs = np.array(np.meshgrid(*[np.arange(v)] * n, indexing="ij")).reshape(n, -1).T
    full = np.concatenate([np.tile(prompt, (len(seqs), 1)), seqs], 1)
    logits, _, _ = system.main(jnp.asarray(full))
    logp = log_probs(logits, sampling)  # (V^n, T, V)
    t0 = len(prompt) - 1
    steps = [np.asarray(logp[np.arange(len(seqs)), t0 + i, seqs[:, i]]) for i in range(n)]
    return np.exp(np.sum(steps, 0, dtype=np.float64))  # (V^n,), index = x_1 * V^(n-1) + ...


def _chi2_pvalue(samples_bn, probs, v):
    from scipy import stats

    idx = np.ravel_multi_index(samples_bn.T, (v,) * samples_bn.shape[1])
    counts = np.bincount(idx, minlength=len(probs))
    expected = probs / probs.sum() * len(idx)  # float32 probabilities sum to 1 +- 1e-7
    big = expected >= 5  # pool rare cells so the chi-square approximation holds
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs[exp > 0], exp[exp > 0]).pvalue


def _wrong_verify(logp, logq, drafts, key):
    """A plausible wrong rule: on rejection draw from p, not from norm(max(0, p - q))."""
    n, _ = verify_sampled(logp, logq, drafts, key)
    p_n = jnp.take_along_axis(jnp.exp(logp), n[:, None, None], 1)[:, 0]
    return n, jax.random.categorical(jax.random.fold_in(key, 1), jnp.log(p_n)).astype(jnp.int32)


def test_speculative_sampling_is_distributed_as_slow_sampling(monkeypatch):
    """Tiny vocabulary: the joint law of the first 3 tokens against the exact slow law."""
    v, k, n, rows = 5, 2, 3, 12_000
    main = dataclasses.replace(MAIN, vocab_size=v, max_len=8)
    system = _system("transformer", k, seed=4, main=main)
    sampling = Sampling(temperature=0.5)
    prompt = np.array([1, 3])
    exact = _exact_slow_distribution(system, prompt, n, sampling)
    dec = Decoder(system, eos_id=NO_EOS)

    def sample(mode):
        res = dec.generate([prompt] * rows, mode=mode, max_new_tokens=n, sampling=sampling, seed=7)
        assert (res.lengths == n).all()
        return res.tokens[:, :n], res

    slow, _ = sample("slow")
    spec, res = sample("speculative")
    assert 0.1 < res.stats["accept_rate"][0] < 0.9  # drafts both accepted and rejected
    assert _chi2_pvalue(slow, exact, v) > 1e-3
    assert _chi2_pvalue(spec, exact, v) > 1e-3
    # the same check catches a wrong acceptance rule
    monkeypatch.setattr(passes, "verify_sampled", _wrong_verify)
    dec._loop.clear_cache()
    wrong, _ = sample("speculative")
    dec._loop.clear_cache()
    assert _chi2_pvalue(wrong, exact, v) < 1e-6


@pytest.mark.parametrize("mode", ["slow", "speculative", "fast", "think"])
def test_compiles_once_per_batch_mode_k_not_as_output_grows(mode):
    main = dataclasses.replace(MAIN, max_len=48)
    dec = Decoder(_system("rnn", 2, seed=5, main=main), eos_id=NO_EOS)
    prompts = _ids(["<bos>ab", "<bos>abcdef"])
    key = (mode, 2, 2)  # mode, k, batch
    before = TRACES[key]
    for n_new in (3, 11, 30):
        res = dec.generate(prompts, mode=mode, max_new_tokens=n_new)
        assert res.lengths.tolist() == [n_new, n_new]
    dec.set_weights(_system("rnn", 2, seed=6, main=main))  # new weights: no new compile
    dec.generate(prompts, mode=mode, max_new_tokens=5, sampling=Sampling())
    assert TRACES[key] - before == 1
    assert not dec.generate(prompts, mode=mode, max_new_tokens=7).compiled
    if mode == "slow":  # another batch size is another compile
        assert dec.generate(prompts[:1], mode=mode, max_new_tokens=7).compiled


def test_urgency_reaches_every_main_pass():
    """The pause-token hook: `urgency_b` is an input of the main model at every pass."""
    main = dataclasses.replace(MAIN, use_urgency=True)
    system = _system("transformer", 2, seed=8, main=main)
    system.main.urgency.set_value(jax.random.normal(jax.random.key(0), (main.d_model,)))
    dec = Decoder(system, eos_id=NO_EOS)
    prompts = _ids(["<bos>ab", "<bos>cd"])
    calm = dec.generate(prompts, mode="speculative", max_new_tokens=12, urgency_b=0.0)
    urgent = dec.generate(prompts, mode="speculative", max_new_tokens=12, urgency_b=[1.0, 0.0])
    np.testing.assert_array_equal(urgent.row(1), calm.row(1))
    assert not np.array_equal(urgent.row(0), calm.row(0))
    slow = dec.generate(prompts, mode="slow", max_new_tokens=12, urgency_b=[1.0, 0.0])
    np.testing.assert_array_equal(slow.row(0), urgent.row(0))


def test_think_budget_forces_the_close_then_answers_slow():
    """After `think_budget` thinking passes the next main token is a forced, flagged </think>."""
    dec = Decoder(_trained("transformer"))
    prompt = _ids(["<bos>q"])
    free = dec.generate(prompt, mode="think", max_new_tokens=60)
    res = dec.generate(prompt, mode="think", max_new_tokens=60, think_budget=2)
    assert not free.forced.any() and free.stats["forced_closes"] == 0
    toks, n = res.row(0), res.lengths[0]
    close = int(np.flatnonzero(toks == TOK.think_close_id)[0])
    assert res.forced[0, :n].tolist() == [i == close for i in range(n)]
    assert res.stats["forced_closes"] == 1
    assert len(set(res.pass_id[0, :close].tolist())) == 2  # two thinking passes
    assert close < int(np.flatnonzero(free.row(0) == TOK.think_close_id)[0])  # cut short
    np.testing.assert_array_equal(toks[:close], free.row(0)[:close])
    prefix = np.concatenate([prompt[0], toks[: close + 1]])
    slow = dec.generate([prefix], mode="slow", max_new_tokens=60 - close - 1)
    np.testing.assert_array_equal(slow.row(0), toks[close + 1 :])
    with pytest.raises(engine.DecodeError, match="think_budget applies to mode='think'"):
        dec.generate(prompt, mode="fast", think_budget=2)
