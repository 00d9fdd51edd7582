"""Pause tokens: masked targets, pauses never in returned text, the cap, fixed-M decoding,
and the urgency input reaching the RL loss. (That urgency changes the model's input is
`test_transformer.test_urgency_changes_the_models_input`.)"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import ConfigError, DrafterConfig, ModelConfig, PauseConfig, RLConfig, validate
from mtp.data.pipeline import insert_pauses, loss_mask
from mtp.data.task_data import encode_example
from mtp.data.tasks import make_task
from mtp.data.tokenizer import EOS_ID, PAD_ID, PAUSE_ID, THINK_CLOSE_ID, ByteTokenizer
from mtp.decode.pause import PauseDecoder, PauseError, PausePolicy
from mtp.model.system import MTPSystem
from mtp.model.transformer import Transformer
from mtp.train import rl
from mtp.train.losses import offset_weights, supervised_loss
from mtp.train.pause_data import pause_rows, prompt_head, with_pauses
from mtp.train.pause_rl import rl_batch

MAIN = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                   max_len=64, use_urgency=True)  # fmt: skip
TOK = ByteTokenizer()


class PauseLover(Transformer):
    """A main model whose top choice is always <pause>: a learned policy at its most eager."""

    def logits(self, x_btd):
        return super().logits(x_btd).at[..., PAUSE_ID].add(100.0)


class CoinFlipPauser(Transformer):
    """A main model for which <pause> is exactly as likely as all other tokens together."""

    def logits(self, x_btd):
        lg = super().logits(x_btd)
        return lg.at[..., PAUSE_ID].set(jax.nn.logsumexp(lg.at[..., PAUSE_ID].set(-jnp.inf), -1))


def _system(seed=0, pause_lover=False):
    s = MTPSystem(MAIN, DrafterConfig(k=2, n_heads=2), pad_id=PAD_ID, rngs=nnx.Rngs(seed))
    if pause_lover:
        s.main = PauseLover(MAIN, rngs=nnx.Rngs(seed))
    return s


def test_pause_targets_are_masked_in_the_loss():
    stream = np.arange(200, dtype=np.int32) % 256
    paused = insert_pauses(stream, 0.3, seed=0)
    assert (paused == PAUSE_ID).sum() > 20
    assert np.array_equal(paused[paused != PAUSE_ID], stream)  # nothing else changes
    tokens = paused[None, :64]
    mask = loss_mask(tokens)
    assert np.all(mask[tokens == PAUSE_ID] == 0)
    # the loss ignores whatever is predicted for a pause target (main and every draft offset)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 64, 264)), jnp.float32)
    draft = jnp.asarray(rng.normal(size=(1, 64, 2, 264)), jnp.float32)
    kw = dict(draft_weights_k=offset_weights(2, 0.8))
    base, _ = supervised_loss(logits, draft, jnp.asarray(tokens), jnp.asarray(mask), **kw)
    pause_at = np.flatnonzero(tokens[0] == PAUSE_ID)
    noisy_logits = logits.at[0, pause_at - 1].add(50.0)  # main logits scoring x_t = pause
    noisy_draft = draft.at[0, pause_at - 2, 0].add(50.0).at[0, pause_at - 3, 1].add(50.0)
    other, _ = supervised_loss(noisy_logits, noisy_draft, jnp.asarray(tokens),
                               jnp.asarray(mask), **kw)  # fmt: skip
    assert float(other) == pytest.approx(float(base), rel=1e-6)


def test_fine_tuning_rows_append_m_masked_pauses_before_the_answer():
    task = make_task("lookup", symbols=6, hops=2)
    rows, mask = pause_rows(task, "train", 32, 64, max_pauses=5, seed=0)
    counts = (rows == PAUSE_ID).sum(1)
    assert counts.min() == 0 and counts.max() == 5
    for row, m_row, ex in zip(rows, mask, task.examples("train", 32), strict=True):
        head = prompt_head(TOK, ex.prompt)
        m = int((row == PAUSE_ID).sum())
        assert np.array_equal(row[: head.size + m], with_pauses(head, m))
        assert TOK.decode(row[head.size + m : head.size + m + 1]) == ex.answer
        assert row[head.size + m + 1] == EOS_ID
        assert np.all(m_row[row == PAUSE_ID] == 0) and m_row[head.size + m] == 1
    _, emit_mask = pause_rows(task, "train", 32, 64, max_pauses=5, seed=0, emit=True)
    assert np.all(emit_mask[rows == PAUSE_ID] == 1)  # learned pausing: pauses are targets


@pytest.mark.parametrize(
    "policy",
    [PausePolicy("fixed", m=3), PausePolicy("confidence", threshold=1.1, cap=3),
     PausePolicy("confidence", threshold=1.1, cap=3, per_token=True),
     PausePolicy("entropy", threshold=-1.0, cap=2, per_token=True),
     PausePolicy("learned", cap=2), PausePolicy("learned", cap=2, per_token=True)],
)  # fmt: skip
def test_pauses_never_appear_in_returned_text_and_the_cap_holds(policy):
    dec = PauseDecoder(_system(pause_lover=policy.kind == "learned"))
    heads = [prompt_head(TOK, "ab ba: 1 hops from a?"), prompt_head(TOK, "x")]
    res = dec.generate(heads, policy, max_new_tokens=4, temperature=0.0)
    for b in range(2):
        assert PAUSE_ID not in res.row(b)
        assert "<pause>" not in TOK.decode(res.row(b), skip_special=False)
        seq = res.seq[b, : res.seq_lengths[b]]
        run = longest = 0
        for t in seq:  # pauses in a row before an answer token
            run = run + 1 if t == PAUSE_ID else 0
            longest = max(longest, run)
        if policy.kind == "fixed":
            assert res.pauses[b] == 3 and PAUSE_ID not in seq
        else:  # these thresholds (and the pause lover) always want a pause
            assert longest == policy.cap
            per_answer = res.lengths[b] if policy.per_token else 1
            assert res.pauses[b] == policy.cap * per_answer
            if not policy.per_token:  # all before the first answer token
                assert (seq[: policy.cap] == PAUSE_ID).all()
        assert res.passes[b] == res.pauses[b] + res.lengths[b]
    if policy.kind == "learned":  # the cap, not the policy, chose the answer tokens
        assert res.forced[0, : res.seq_lengths[0]].sum() == res.lengths[0]


def test_fixed_pauses_greedy_matches_a_full_forward():
    system = _system(seed=1)
    head = with_pauses(prompt_head(TOK, "cd dc: 1 hops from c?"), 4)
    res = PauseDecoder(system).generate([head], PausePolicy("fixed", m=2), max_new_tokens=5)
    seq = list(with_pauses(head, 2))
    for _ in range(5):  # plain greedy with the whole sequence recomputed, pause never chosen
        logits, _, _ = system.main(jnp.asarray([seq]), urgency_b=jnp.zeros(1))
        seq.append(int(jnp.argmax(logits[0, -1].at[PAUSE_ID].set(-jnp.inf))))
    assert list(res.row(0)) == seq[len(head) + 2 :]


def test_bad_pause_input_is_a_clear_error():
    with pytest.raises(PauseError, match="unknown"):
        PausePolicy("sometimes")
    dec = PauseDecoder(_system())
    with pytest.raises(PauseError, match="before each answer token.* = 108 exceeds the cache"):
        dec.generate([np.arange(40) % 256], PausePolicy("confidence", cap=16, per_token=True),
                     max_new_tokens=4)  # fmt: skip
    dec.generate([np.arange(40) % 256], PausePolicy("confidence", cap=16), max_new_tokens=4)
    with pytest.raises(PauseError, match="before the answer.* = 65 exceeds the cache"):
        dec.generate([np.arange(40) % 256], PausePolicy("confidence", cap=21), max_new_tokens=4)
    c = validate_pause_config()
    c.model.use_urgency = False
    with pytest.raises(ConfigError, match="use_urgency"):
        validate(c)
    c = validate_pause_config()
    c.pause.rule = "vibes"
    with pytest.raises(ConfigError, match="pause.rule"):
        validate(c)


def validate_pause_config():
    from mtp.config import default_config

    c = default_config()
    c.model.use_urgency = True
    c.pause = dataclasses.asdict(PauseConfig())
    validate(c)
    return c


def test_pause_rl_loss_sees_the_urgency_input():
    system = _system()
    system.main.urgency[...] = jnp.ones((MAIN.d_model,))
    heads = [prompt_head(TOK, "ab ba: 1 hops from a?")] * 2
    res = PauseDecoder(system).generate(heads, PausePolicy("learned", cap=2), max_new_tokens=3,
                                        temperature=1.0, seed=0)  # fmt: skip
    rc = RLConfig(loss="reinforce", temperature=1.0)
    losses = []
    for u in (0.0, 1.0):
        batch = rl_batch(heads, res, np.array([1.0, -1.0]), np.array([u, u]))
        batch = jax.tree.map(jnp.asarray, batch)
        losses.append(float(rl.rl_loss(system, batch, rc, True)[0]))
    assert losses[0] != pytest.approx(losses[1])
    assert batch["mask"].sum() == res.choice.sum() > 0
    assert not (res.choice & res.forced).any()
    assert THINK_CLOSE_ID in np.asarray(batch["tokens"][0])


def test_learned_pauses_are_sampled_decisions_with_greedy_answers():
    """RL's rollouts: pause-or-go-on drawn at temperature 1, answer tokens greedy, and the
    loss scores the decision (log 1/2 either way here), not the answer token."""
    system = _system()
    system.main = CoinFlipPauser(MAIN, rngs=nnx.Rngs(0))
    heads = [prompt_head(TOK, "12*34=")] * 16
    policy = PausePolicy("learned", cap=4)
    res = PauseDecoder(system).generate(heads, policy, max_new_tokens=3, temperature=1.0,
                                        answer_temperature=0.0, seed=0)  # fmt: skip
    assert len(set(res.pauses.tolist())) > 1  # sampled decisions differ between rows
    batch = jax.tree.map(jnp.asarray, rl_batch(heads, res, np.zeros(16), np.zeros(16)))
    tokens, mask = batch["tokens"], np.asarray(batch["mask"]) > 0
    dist, _ = rl.token_dists(system, tokens, batch["offset"], 1.0, batch["urgency"])
    at = np.arange(tokens.shape[1]) - heads[0].size
    generated = (at >= 0) & (at < res.seq_lengths[:, None])
    answer = generated & (np.asarray(tokens) != PAUSE_ID)
    # decisions: every pause, then the first answer token unless the cap chose it; later
    # answer tokens are not
    np.testing.assert_array_equal(mask.sum(1), res.pauses + (res.pauses < policy.cap))
    assert (res.pauses == policy.cap).any()
    greedy = np.asarray(dist.at[..., PAUSE_ID].set(-jnp.inf).argmax(-1))
    np.testing.assert_array_equal(np.asarray(tokens)[answer], greedy[answer])
    args = (system, tokens, batch["offset"], 1.0, batch["urgency"])
    lp = np.asarray(rl.token_stats(*args, batch["decision"])[0])
    np.testing.assert_allclose(lp[mask], np.log(0.5), atol=1e-4)
    token_lp = np.asarray(rl.token_stats(*args)[0])
    assert (token_lp[answer & mask] < np.log(0.5) - 0.1).all()  # not the answer token's lp


def test_think_mode_answers_after_the_thought_with_pauses():
    dec = PauseDecoder(_system(seed=2))
    prompts = [encode_example(TOK, "ab ba: 1 hops from a?<think>")[:-1]] * 2
    thoughts, res = dec.think(prompts, PausePolicy("fixed", m=4), think_tokens=6,
                              max_new_tokens=3)  # fmt: skip
    for b in range(2):
        assert thoughts[b][-1] == THINK_CLOSE_ID and thoughts[b].size <= 7
        assert PAUSE_ID not in res.row(b) and res.pauses[b] == 4
    slow = dec.generate([np.concatenate([prompts[0], thoughts[0]])], PausePolicy("fixed", m=4),
                        max_new_tokens=3)  # fmt: skip
    assert np.array_equal(slow.row(0), res.row(0))


def test_pause_pipeline_writes_the_report_and_skips_finished_phases(tmp_path):
    """experiments/pause.py:smoke end to end: three models, the report, then a re-run that
    trains nothing (every phase has its checkpoint)."""
    import importlib.util
    import pathlib

    from mtp.train import pause as pause_pipeline

    path = pathlib.Path(__file__).parent.parent / "experiments" / "pause.py"
    spec = importlib.util.spec_from_file_location("pause_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    out = pause_pipeline.run_pipeline(config, tmp_path)
    assert (tmp_path / "pause_report.md").exists()
    for model in ("plain", "paused"):
        assert set(out["fixed"][model]) == {0, 2}
        for m, row in out["fixed"][model].items():
            assert 0.0 <= row["accuracy"] <= 1.0 and row["pauses"] == int(m)
    assert {a["urgency"] for a in out["adaptive"] if a["model"] == "learned"} == {0.0, 1.0}
    assert "## Findings" in (tmp_path / "pause_report.md").read_text()
    assert any(line.startswith("learned: urgency 1 spends") for line in out["findings"])
    tpp = out["tokens_per_pass"]
    assert tpp["fast (1 + k, k=2)"] == 3.0 and tpp["slow (1)"] == 1.0
    mtimes = {p: p.stat().st_mtime for p in tmp_path.glob("*/checkpoints/*")}
    pause_pipeline.run_pipeline(config, tmp_path)
    assert {p: p.stat().st_mtime for p in tmp_path.glob("*/checkpoints/*")} == mtimes


def test_pause_decision_gradient_moves_only_the_pause_logit():
    logits = jax.random.normal(jax.random.key(0), (1, 2, 264)) * 3
    tokens = jnp.array([[PAUSE_ID, 65]])
    lp = rl.pause_decision_logprob(logits, tokens)
    p = jax.nn.softmax(logits)[..., PAUSE_ID]
    np.testing.assert_allclose(lp, jnp.log(jnp.array([[p[0, 0], 1 - p[0, 1]]])), atol=1e-6)
    grad = jax.grad(lambda z: rl.pause_decision_logprob(z, tokens).sum())(logits)
    others = np.asarray(grad).copy()
    others[..., PAUSE_ID] = 0
    assert np.abs(others).max() == 0.0 and (np.abs(np.asarray(grad[..., PAUSE_ID])) > 0).all()


def test_report_findings_answer_the_issue_questions_from_the_numbers():
    from mtp.evals.pause_report import findings

    fixed = {"paused": {0: 0.2, 2: 0.3, 16: 0.25}, "plain": {0: 0.2, 2: 0.0, 16: 0.0}}
    rule = {"model": "paused", "urgency": 0.0, "accuracy": 0.35, "pauses": 3.0,
            "best_fixed_at_or_below": (2, 0.3)}  # fmt: skip
    learned = [{"model": "learned", "urgency": u, "pauses": p} for u, p in ((0.0, 4.0), (1.0, 1.0))]
    lines = findings(fixed, [rule, *learned])
    assert lines[0].startswith("pause-trained: M=0 0.200, best M=2 0.300 (+10.0 points)")
    assert lines[0].endswith("pauses help") and lines[1].endswith("pauses do not help")
    assert lines[2].startswith("adaptive rule: 1 of 1")
    assert lines[3].endswith(": fewer at urgency 1")
    learned[1]["pauses"] = 4.0
    assert findings(fixed, [rule, *learned])[3].endswith("NOT fewer at urgency 1")
