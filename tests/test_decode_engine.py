"""Decoding engine: speculative is lossless, fast feeds k + 1, think switches, one compile."""

import dataclasses
import functools
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import verify_rules
from flax import nnx
from scipy import stats

from mtp.config import ConfigError, DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import TRACES, Decoder
from mtp.decode.modes import Pause, Speculative, make_mode
from mtp.decode.sampling import Sampling, log_probs
from mtp.decode.shapes import cache_slots, prompt_width
from mtp.decode.speculative import verify_sampled
from mtp.decode.thinking import think_then_answer
from mtp.errors import DecodeError
from mtp.model.system import MTPSystem, shifted

TOK = ByteTokenizer()
MAIN = ModelConfig(vocab_size=262, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=80)
KINDS = ["transformer", "medusa", "rnn", "context"]  # context: the transformer reading it
S = TOK.specials
NO_STOP = -1  # a stop_id no token matches: rows run to their limit

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
    if kind == "context":
        drafter = DrafterConfig(kind="transformer", k=k, n_heads=4, context=True)
    else:
        drafter = DrafterConfig(kind=kind, k=k, n_heads=4)
    return MTPSystem(main, drafter, pad_id=S.pad, rngs=nnx.Rngs(seed))


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
    return Decoder(system, S).generate(_ids(PROMPTS), mode="slow", max_new_tokens=40)


def _accepted_vs_teacher_forced(system, prompts, res):
    """Per verify pass: (drafts the engine accepted, drafts a greedy drafter accepts when
    drafting after the same main token from the teacher-forced forward at the right
    position), for passes whose decision is clear of float ties.

    In the output a main token (offset 0) at sequence position t + 1 is followed by the
    drafts its pass accepted, then the next main token. Those drafts were drafted from the
    taps at t: greedy drafts are accepted while they equal the tokens that follow, and
    while they do, they are the teacher-forced inputs, so the teacher-forced draft logits
    at t decide how many are accepted.
    """
    seqs = [np.concatenate([p, res.row(b)]) for b, p in enumerate(prompts)]
    width = max(len(q) for q in seqs)
    padded = np.stack([np.pad(q, (0, width - len(q)), constant_values=S.pad) for q in seqs])
    _, draft_btkv = system(jnp.asarray(padded))  # causal: the padding changes nothing used
    draft_btkv = np.asarray(draft_btkv)
    top2_btk2 = np.sort(draft_btkv, -1)[..., -2:]
    clear_btk = top2_btk2[..., 1] - top2_btk2[..., 0] > 1e-4
    k, out = system.k, []
    for b, (prompt, seq) in enumerate(zip(prompts, seqs, strict=True)):
        mains = np.flatnonzero(res.offset[b, : res.lengths[b]] == 0)
        for i, nxt in zip(mains[:-1], mains[1:], strict=True):  # passes that emitted a main
            t = len(prompt) + i - 1
            follow = seq[t + 2 : t + 2 + k]
            n = int(np.cumprod(draft_btkv[b, t, : len(follow)].argmax(-1) == follow).sum())
            if clear_btk[b, t, : min(n + 1, k)].all():
                out.append((nxt - i - 1, n))
    return np.array(out).T


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_speculative_greedy_equals_slow(kind, k):
    """Token for token, batched over ragged prompts, on random and on trained weights; every
    pass accepts as many drafts as drafting from the accepted token's position accepts."""
    dec = Decoder(_with_k(_system(kind), kind, k), S)
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
        system = _with_k(_trained(kind) if trained else _system(kind), kind, k)
        engine_n, teacher_n = _accepted_vs_teacher_forced(system, _ids(PROMPTS), spec)
        np.testing.assert_array_equal(engine_n, teacher_n)
        assert len(engine_n) > 0.9 * (spec.passes.sum() - 2 * len(PROMPTS))  # few ties left out
        if trained:  # the test exercises accepted drafts and rows stopping at EOS
            assert st["mean_accepted"] > 0.8 * k, st  # 0.94 k to k with the right taps
            assert (teacher_n > 0).mean() > 0.8
            stopped = [b for b in range(len(PROMPTS)) if slow.lengths[b] < 40]
            assert stopped and all(slow.row(b)[-1] == S.eos for b in stopped)


@pytest.mark.parametrize("mode", ["slow", "speculative", "fast", "think"])
def test_a_bfloat16_system_decodes_in_every_mode(mode):
    """bfloat16 weights and compute (a pretrained model's `param_dtype`, `dtype`) decode in the
    one loop (the carry keeps the pass's dtype); greedy speculative follows greedy slow up to
    bfloat16 rounding, which on a random model's near-tied logits splits some rows early."""
    main = dataclasses.replace(MAIN, dtype="bfloat16", param_dtype="bfloat16")
    system = MTPSystem(main, DrafterConfig(k=3, n_heads=4), pad_id=S.pad, rngs=nnx.Rngs(0))
    dec = Decoder(system, S)
    res = dec.generate(_ids(PROMPTS), mode=mode, max_new_tokens=12, stop_id=NO_STOP)
    assert (res.lengths == 12).all()
    if mode == "speculative":
        slow = dec.generate(_ids(PROMPTS), mode="slow", max_new_tokens=12, stop_id=NO_STOP)
        assert (res.tokens[:, :12] == slow.tokens[:, :12]).mean() > 0.5  # 0.83 measured


def test_batched_rows_equal_rows_decoded_alone():
    system = _trained("transformer")
    batch = Decoder(system, S).generate(_ids(PROMPTS), mode="speculative", max_new_tokens=24)
    for b, prompt in enumerate(PROMPTS):
        alone = Decoder(system, S).generate(_ids([prompt]), mode="speculative", max_new_tokens=24)
        np.testing.assert_array_equal(alone.row(0), batch.row(b))


def test_speculation_is_off_past_max_batch():
    """Up to max_batch rows a call speculates; past it the call decodes in slow mode, with the
    same greedy tokens; None is the backend's limit (4 rows on CPU), 0 no limit."""
    dec = Decoder(_trained("transformer"), S)
    four, five = _ids(PROMPTS), _ids([*PROMPTS, "<bos>p"])
    gen = lambda rows, mode: dec.generate(rows, mode=mode, max_new_tokens=24)
    slow = gen(five, "slow")
    for mode, rows, ran in [
        (Speculative(max_batch=4), four, "speculative"), (Speculative(max_batch=4), five, "slow"),
        (Speculative(max_batch=2), four, "slow"), (Speculative(max_batch=5), five, "speculative"),
        (Speculative(max_batch=0), five, "speculative"),
    ]:  # fmt: skip
        res = gen(rows, mode)
        assert res.mode == ran, (mode, len(rows))
        assert (res.stats.get("mean_accepted", 0) > 1) == (ran == "speculative")
        np.testing.assert_array_equal(res.tokens, slow.tokens[: len(rows), : res.tokens.shape[1]])
    on_cpu = jax.default_backend() == "cpu"
    assert not on_cpu or [gen(r, "speculative").mode for r in (four, five)] == [
        "speculative",
        "slow",
    ]
    with pytest.raises(ConfigError, match="max_batch"):
        Speculative(max_batch=-1)


@pytest.mark.parametrize("mode", ["slow", "speculative", "fast", "think"])
def test_kept_taps_are_the_full_forwards_at_every_fed_position(mode):
    """`keep_taps`: the taps at every prompt position and every emitted token, the last
    included, equal a full forward's over the finished row, whatever a pass fed (fast: k + 1
    tokens; speculative: drafts, some rejected and fed again; think: one-token passes after
    the span), and without the option there are none."""
    system = _trained("transformer")
    dec, prompts = Decoder(system, S), _ids(PROMPTS)
    res = dec.generate(prompts, mode=mode, max_new_tokens=24, keep_taps=True)
    assert dec.generate(prompts, mode=mode, max_new_tokens=24).taps is None
    for b, prompt in enumerate(prompts):
        seq = np.concatenate([prompt, res.row(b)])
        want = np.asarray(system.main_taps(jnp.asarray(seq)[None]))[0]
        np.testing.assert_allclose(res.taps[b, : seq.size], want, atol=2e-5, rtol=1e-4)
    with pytest.raises(DecodeError, match="keep_taps: not with draft trees"):
        dec.generate(prompts, mode=Speculative(tree_nodes=4), keep_taps=True)


@pytest.mark.parametrize("k", [1, 3])
def test_fast_emits_k_plus_1_tokens_per_pass_and_feeds_them_all(k):
    system = _system("transformer", k, seed=1)
    n_new = 4 * (k + 1)
    res = Decoder(system, S).generate(
        _ids(PROMPTS[:2]), mode="fast", max_new_tokens=n_new, stop_id=NO_STOP
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


def test_fast_mode_drafts_from_the_context_its_passes_wrote():
    """With a drafter that reads the context, each fast pass's drafts are the teacher-forced
    drafter's greedy choices at its root over the whole emitted sequence: the context cache
    the prefill and every fed pass wrote is the past the teacher-forced forward reads."""
    k = 3
    system = _system("context", k, seed=1)
    n_new = 4 * (k + 1)
    prompts = _ids(PROMPTS[:2])
    res = Decoder(system, S).generate(prompts, mode="fast", max_new_tokens=n_new, stop_id=NO_STOP)
    for b, prompt in enumerate(prompts):
        seq = jnp.asarray(np.concatenate([prompt, res.row(b)]))[None]
        _, draft_1tkv = system(seq)
        for i in range(0, n_new, k + 1):
            t = len(prompt) + i - 1  # the root: output i is its main token, i + 1.. its drafts
            want = np.asarray(draft_1tkv[0, t].argmax(-1))
            np.testing.assert_array_equal(res.row(b)[i + 1 : i + 1 + k], want)


def test_think_is_fast_inside_the_span_and_slow_after_it():
    system = _trained("transformer")
    dec = Decoder(system, S)
    res = dec.generate(_ids(["<bos>q", "<bos>p<think>a"]), mode="think", max_new_tokens=60)
    for b in range(2):
        toks, offs, passes = res.row(b), res.offset[b, : res.lengths[b]], res.pass_id[b]
        assert S.think_close in toks, TOK.decode(toks, False)  # the model closes its span
        close = int(np.flatnonzero(toks == S.think_close)[0])
        assert offs[close + 1 :].max(initial=0) == 0  # the answer: main tokens only
        assert len(set(passes[close + 1 : res.lengths[b]])) == res.lengths[b] - close - 1
        assert offs[: close + 1].max() >= 1  # drafts were kept in the span
        # and the answer is what slow decoding gives after the thinking text
        prefix = np.concatenate([_ids([["<bos>q", "<bos>p<think>a"][b]])[0], toks[: close + 1]])
        slow = dec.generate([prefix], mode="slow", max_new_tokens=60 - close - 1)
        np.testing.assert_array_equal(slow.row(0), toks[close + 1 :])
    assert res.stats["tokens_per_pass"] > 1.5
    # "<bos>q" is not thinking at first: the first pass emits "<think>" and keeps its drafts
    assert res.row(0)[0] == S.think_open and res.offset[0, 1] == 1


def test_think_without_a_span_is_slow():
    dec = Decoder(_system("transformer", 2, seed=3), S)
    prompts = _ids(["<bos>answer:", "<bos>x"])
    think = dec.generate(prompts, mode="think", max_new_tokens=20, stop_id=NO_STOP)
    slow = dec.generate(prompts, mode="slow", max_new_tokens=20, stop_id=NO_STOP)
    for b in range(2):
        if S.think_open not in slow.row(b):  # a random model might open one
            np.testing.assert_array_equal(think.row(b), slow.row(b))
            assert think.passes[b] == 20


# A 5-token vocabulary, so the slow law of the first N_LAW tokens can be enumerated. At this
# temperature the untrained drafter and main model overlap by ~0.75 per offset: passes accept
# all k = 3 drafts often, and N_LAW = 5 covers the first verify pass whole (the prefill's
# token, 3 drafts or the correction after fewer, then the bonus token).
LAW_MAIN = dataclasses.replace(MAIN, vocab_size=5, max_len=16)
LAW_SAMPLING = Sampling(temperature=1.5, top_k=4, top_p=0.9)
LAW_PROMPT, N_LAW, LAW_ROWS = np.array([1, 3]), 5, 8000
SPEC = Speculative(max_batch=0)  # speculates at LAW_ROWS rows too


@functools.cache
def _law_case():
    """The system and the exact law of its first N_LAW tokens under slow sampling,
    (V^N_LAW,) indexed by x_1 * V^(N_LAW - 1) + ..., and the tokens kept per step."""
    system = _system("transformer", 3, seed=0, main=LAW_MAIN)
    v, n = LAW_MAIN.vocab_size, N_LAW
    seqs = np.array(np.meshgrid(*[np.arange(v)] * n, indexing="ij")).reshape(n, -1).T
    full = np.concatenate([np.tile(LAW_PROMPT, (len(seqs), 1)), seqs], 1)
    logits, _, _ = system.main(jnp.asarray(full))
    t0 = len(LAW_PROMPT) - 1
    logp = np.asarray(log_probs(logits[:, t0 : t0 + n], LAW_SAMPLING), np.float64)  # (V^n, n, V)
    steps = np.take_along_axis(logp, seqs[..., None], -1)[..., 0]
    return system, np.exp(steps.sum(1)), np.isfinite(logp).sum(-1)


def _law_samples(mode, seed=7):
    """LAW_ROWS independent samples of the first N_LAW tokens, in one batched call."""
    system, _, _ = _law_case()
    res = Decoder(system, S).generate(
        [LAW_PROMPT] * LAW_ROWS, mode=mode, max_new_tokens=N_LAW, sampling=LAW_SAMPLING,
        seed=seed, stop_id=NO_STOP,
    )  # fmt: skip
    assert (res.lengths == N_LAW).all()
    return res.tokens[:, :N_LAW], res


def _law_fit(samples_bn, probs) -> float:
    """Chi-square p-value of the samples' joint law against `probs`; 0 if any sample has
    probability 0 there. Rare cells are pooled so the chi-square approximation holds."""
    v = LAW_MAIN.vocab_size
    counts = np.bincount(np.ravel_multi_index(samples_bn.T, (v,) * N_LAW), minlength=len(probs))
    if counts[probs == 0].any():
        return 0.0
    expected = probs / probs.sum() * len(samples_bn)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return stats.chisquare(obs, exp).pvalue


@pytest.fixture
def engine_verify_rule(monkeypatch):
    """`use(rule)` makes the engine verify sampled drafts with `rule` instead of
    `verify_sampled` (in every mtp module that binds that name), recompiling the loop."""

    def use(rule):
        binds = lambda name, m: (
            name.startswith("mtp.") and (getattr(m, "verify_sampled", None) is verify_sampled)
        )
        bound = [m for name, m in list(sys.modules.items()) if binds(name, m)]
        assert bound, "no mtp module binds verify_sampled; point this fixture at the engine's"
        for module in bound:
            monkeypatch.setattr(module, "verify_sampled", rule)
        jax.clear_caches()  # compiled loops hold the rule they were traced with

    yield use
    monkeypatch.undo()
    jax.clear_caches()


def test_speculative_sampling_is_distributed_as_slow_sampling():
    """k = 3, temperature, top-k and top-p on p and q: the joint law of the first 5 tokens
    (the whole first verify pass, bonus included) against the exact slow law."""
    _, exact, kept = _law_case()
    assert set(np.unique(kept)) == {3, 4}  # top-k cuts one token everywhere, top-p more
    slow, _ = _law_samples("slow")
    spec, res = _law_samples(SPEC)
    assert min(res.stats["accept_rate"]) > 0.3, res.stats  # every offset, the last included
    bonus = (res.offset[:, 1:N_LAW] == [1, 2, 3, 0]).all(1)  # all 3 drafts, then the bonus
    assert bonus.mean() > 0.3
    assert _law_fit(slow, exact) > 1e-3
    assert _law_fit(spec, exact) > 1e-3


def test_the_engine_runs_the_rebuilt_rule_exactly(engine_verify_rule):
    """The rule the negative controls below break, rebuilt, gives the same tokens."""
    right, _ = _law_samples(SPEC)
    engine_verify_rule(verify_rules.RIGHT)
    np.testing.assert_array_equal(_law_samples(SPEC)[0], right)


@pytest.mark.parametrize("wrong", verify_rules.WRONG)
def test_the_same_check_rejects_a_wrong_rule_in_the_engine(wrong, engine_verify_rule):
    engine_verify_rule(verify_rules.WRONG[wrong])
    samples, _ = _law_samples(SPEC)
    assert _law_fit(samples, _law_case()[1]) < 1e-6


@pytest.mark.parametrize(
    "mode", ["slow", "speculative", "fast", "think", Pause("confidence", threshold=0.5, cap=2)]
)
def test_compiles_once_per_batch_mode_k_not_as_output_grows(mode):
    main = dataclasses.replace(MAIN, max_len=48)
    dec = Decoder(_system("rnn", 2, seed=5, main=main), S)
    prompts = _ids(["<bos>ab", "<bos>abcdef"])
    key = (make_mode(mode).name, 2, 2, 48)  # mode, k, batch, cache slots (all of max_len here)
    before = TRACES[key]
    for n_new in (3, 11, 30):
        res = dec.generate(prompts, mode=mode, max_new_tokens=n_new, stop_id=NO_STOP)
        assert [res.answer_row(b).size for b in range(2)] == [n_new, n_new]
    dec.set_weights(_system("rnn", 2, seed=6, main=main))  # new weights: no new compile
    dec.generate(prompts, mode=mode, max_new_tokens=5, sampling=Sampling(), stop_id=NO_STOP)
    assert TRACES[key] - before == 1
    assert not dec.generate(prompts, mode=mode, max_new_tokens=7, stop_id=NO_STOP).compiled
    if mode == "slow":  # another batch size is another compile
        assert dec.generate(prompts[:1], mode=mode, max_new_tokens=7, stop_id=NO_STOP).compiled


def _loop_body_hlo(dec, prompt, mode) -> str:
    """The optimized HLO of the engine's compiled `while` body for one prompt and mode."""
    call = dec.prepare([prompt], mode=mode, max_new_tokens=8)
    prefill, loop = dec.jits(call.slots)
    after_prefill = jax.eval_shape(prefill, dec.state, *call.prefill_args)
    lowered = loop.lower(dec.state, *after_prefill, *call.loop_args, plan=call.plan)
    hlo = lowered.compile().as_text()
    body = re.search(r"while\(.*body=%([\w.\-]+)", hlo).group(1)
    return re.search(rf"^%{re.escape(body)} .*?^}}", hlo, re.M | re.S).group(0)


@pytest.mark.parametrize("mode", ["slow", "speculative", Speculative(tree_nodes=4, tree_beams=2)])
def test_the_decoding_loop_updates_the_kv_cache_in_place(mode):
    """No pass copies a layer's KV cache: each is read before the pass writes its fed tokens,
    and XLA may update it in place inside the `while` (a copy per layer per pass cost a
    third of a batch-1 SmolLM2 pass)."""
    system = _system("context", 2)
    dec = Decoder(system, S)
    b, g, s, h = system.init_cache(1).main[0]["k"].shape
    cache_shape = f"f32[{b},{g},{s},{h}]"
    body = _loop_body_hlo(dec, _ids(["<bos>q<think>the"])[0], mode)
    assert "dynamic-update-slice" in body or "scatter" in body  # the cache is written here
    copies = [ln for ln in body.splitlines() if " copy(" in ln and cache_shape in ln]
    assert copies == [], f"{len(copies)} copies of a {cache_shape} cache buffer per pass"


def test_urgency_reaches_every_main_pass():
    """The pause-token hook: `urgency_b` is an input of the main model at every pass."""
    main = dataclasses.replace(MAIN, use_urgency=True)
    system = _system("transformer", 2, seed=8, main=main)
    system.main.urgency.set_value(jax.random.normal(jax.random.key(0), (main.d_model,)))
    dec = Decoder(system, S)
    prompts = _ids(["<bos>ab", "<bos>cd"])
    gen = functools.partial(dec.generate, prompts, max_new_tokens=12, stop_id=NO_STOP)
    calm = gen(mode="speculative", urgency_b=0.0)
    urgent = gen(mode="speculative", urgency_b=[1.0, 0.0])
    np.testing.assert_array_equal(urgent.row(1), calm.row(1))
    assert not np.array_equal(urgent.row(0), calm.row(0))
    slow = gen(mode="slow", urgency_b=[1.0, 0.0])
    np.testing.assert_array_equal(slow.row(0), urgent.row(0))


def test_think_budget_forces_the_close_then_answers_slow():
    """After `think_budget` fast passes the thought gets a forced </think>; the answer is
    what slow decoding gives after it."""
    dec = Decoder(_trained("transformer"), S)
    head = _ids(["<bos>q<think>"])
    free = think_then_answer(dec, head, thought_mode="fast", answer_max_tokens=8)
    th = think_then_answer(dec, head, thought_mode="fast", think_budget=2, answer_max_tokens=8)
    assert not free.forced[0] and th.forced[0]
    thought, width = th.thoughts[0], dec.k + 1
    assert thought.size == 2 * width + 1 and thought[-1] == S.think_close
    assert len(set(th.thought.pass_id[0, : 2 * width].tolist())) == 2  # two thinking passes
    assert free.thoughts[0].size > thought.size  # cut short
    np.testing.assert_array_equal(thought[:-1], free.thoughts[0][: 2 * width])
    slow = dec.generate([np.concatenate([head[0], thought])], mode="slow", max_new_tokens=8)
    np.testing.assert_array_equal(slow.row(0), th.answer.row(0))
    with pytest.raises(DecodeError, match="think_budget must be >= 0"):
        think_then_answer(dec, head, think_budget=-1)


@pytest.mark.parametrize("kind", ["transformer", "context"])
def test_a_shorter_cache_decodes_the_same_rows(kind):
    """`with_max_len` gives the same weights caches of fewer slots (each pass's attention
    reads them all): rows that fit decode to the same tokens, slow and speculative, while
    the caches hold only those slots."""
    system = _trained(kind)
    short = system.with_max_len(48)
    assert (
        short.init_cache(1).main[0]["k"].shape[2] == system.init_cache(1).main[0]["k"].shape[2] - 32
    )
    if kind == "context":
        assert jax.tree.leaves(short.init_cache(1).context)[0].shape[2] == 48
    prompts = _ids(PROMPTS)
    for mode in ("slow", "speculative"):
        want = Decoder(system, S).generate(prompts, mode=mode, max_new_tokens=24)
        got = Decoder(short, S).generate(prompts, mode=mode, max_new_tokens=24)
        for i in range(len(prompts)):
            np.testing.assert_array_equal(got.row(i), want.row(i))
    with pytest.raises(ConfigError, match="with_max_len: n must be in 1..model.max_len=80"):
        system.with_max_len(81)


def test_cache_slots_are_few_sizes_that_hold_the_call_within_max_len():
    sizes = [cache_slots(n, 512) for n in (1, 64, 65, 96, 97, 129, 193, 257, 385, 600)]
    assert sizes == [64, 64, 96, 96, 128, 192, 256, 384, 512, 512]
    assert all(cache_slots(n, 80) == min(80, cache_slots(n, 512)) for n in range(1, 300))
    assert all(n <= cache_slots(n, 10**6) < 1.5 * n for n in range(64, 5000))


@pytest.mark.parametrize(
    "kind, mode",
    [("transformer", "slow"), ("transformer", "speculative"), ("context", "speculative"),
     ("transformer", Speculative(tree_nodes=4, tree_beams=2))],
)  # fmt: skip
def test_a_call_decodes_on_a_cache_of_its_own_size_to_the_same_tokens(kind, mode):
    """A short call gets a short cache (each pass's attention reads every slot; a drafter
    that reads the context has one of the same size), its outputs as long; the tokens are
    those of the same call on the whole max_len cache."""
    main = dataclasses.replace(MAIN, max_len=400)
    system = _trained(kind)
    long = _system(kind, main=main)
    nnx.update(long, nnx.state(system))
    dec, prompts = Decoder(long, S), _ids(PROMPTS)
    short = dec.generate(prompts, mode=mode, max_new_tokens=24, stop_id=NO_STOP)
    assert short.tokens.shape[1] == 64  # the longest prompt (17 tokens) + 24 new
    whole = dec.generate(prompts, mode=mode, max_new_tokens=380, stop_id=NO_STOP)
    assert whole.tokens.shape[1] == 400
    for i in range(len(prompts)):
        np.testing.assert_array_equal(short.row(i), whole.row(i)[:24])


def test_prompts_pad_to_a_power_of_two_then_to_multiples_of_32_within_the_cache():
    """A prefill is compute-bound: past 32 tokens its width wastes less than 32 positions."""
    widths = [prompt_width(n, 512) for n in (1, 9, 20, 32, 33, 65, 130, 183)]
    assert widths == [8, 16, 32, 32, 64, 96, 160, 192]
    assert prompt_width(300, 288) == 288
