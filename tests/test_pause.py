"""Pause tokens: masked targets, pauses never in returned answers, the cap, fixed-M decoding,
and the urgency input reaching the RL loss. (That urgency changes the model's input is
`test_transformer.test_urgency_changes_the_models_input`.)"""

import dataclasses
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import (
    ConfigError,
    DataConfig,
    DrafterConfig,
    ModelConfig,
    PauseConfig,
    RLConfig,
    default_config,
    resolve,
)
from mtp.data.format import answer_text, encode_prompt, insert_pauses, loss_mask, with_pauses
from mtp.data.task_data import task_rows
from mtp.data.tasks import Example, make_task
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.decode.modes import Pause
from mtp.decode.thinking import think_then_answer
from mtp.errors import DecodeError
from mtp.evals.pause_report import findings
from mtp.model.system import MTPSystem
from mtp.model.transformer import Transformer
from mtp.programs.pause import run_pause
from mtp.rl.objectives import rl_loss, token_dists, token_stats
from mtp.rl.rollouts import PauseRollout, pause_decision_logprob
from mtp.rl.steps import jit_rl_steps
from mtp.train.losses import offset_weights, supervised_loss

MAIN = ModelConfig(vocab_size=264, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                   max_len=64, use_urgency=True)  # fmt: skip
TOK = ByteTokenizer()
S = TOK.specials


class PauseLover(Transformer):
    """A main model whose top choice is always <pause>: a learned policy at its most eager."""

    def logits(self, x_btd):
        return super().logits(x_btd).at[..., S.pause].add(100.0)


class CoinFlipPauser(Transformer):
    """A main model for which <pause> is exactly as likely as all other tokens together."""

    def logits(self, x_btd):
        lg = super().logits(x_btd)
        return lg.at[..., S.pause].set(jax.nn.logsumexp(lg.at[..., S.pause].set(-jnp.inf), -1))


def _system(seed=0, pause_lover=False):
    s = MTPSystem(MAIN, DrafterConfig(k=2, n_heads=2), pad_id=S.pad, rngs=nnx.Rngs(seed))
    if pause_lover:
        s.main = PauseLover(MAIN, rngs=nnx.Rngs(seed))
    return s


def _head(prompt, thought=""):
    """<bos> prompt <think> thought </think>: what the answer (and its pauses) follows."""
    return encode_prompt(TOK, prompt, thought)


def test_pause_targets_are_masked_in_the_loss():
    stream = np.arange(200, dtype=np.int32) % 256
    paused = insert_pauses(TOK, stream, 0.3, seed=0)
    assert (paused == S.pause).sum() > 20
    assert np.array_equal(paused[paused != S.pause], stream)  # nothing else changes
    tokens = paused[None, :64]
    mask = loss_mask(TOK, tokens)
    assert np.all(mask[tokens == S.pause] == 0)
    # the loss ignores whatever is predicted for a pause target (main and every draft offset)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(1, 64, 264)), jnp.float32)
    draft = jnp.asarray(rng.normal(size=(1, 64, 2, 264)), jnp.float32)
    kw = dict(draft_weights_k=offset_weights(2, 0.8))
    base, _ = supervised_loss(logits, draft, jnp.asarray(tokens), jnp.asarray(mask), **kw)
    pause_at = np.flatnonzero(tokens[0] == S.pause)
    noisy_logits = logits.at[0, pause_at - 1].add(50.0)  # main logits scoring x_t = pause
    noisy_draft = draft.at[0, pause_at - 2, 0].add(50.0).at[0, pause_at - 3, 1].add(50.0)
    other, _ = supervised_loss(noisy_logits, noisy_draft, jnp.asarray(tokens),
                               jnp.asarray(mask), **kw)  # fmt: skip
    assert float(other) == pytest.approx(float(base), rel=1e-6)


def test_fine_tuning_rows_append_m_masked_pauses_before_the_answer():
    spec = "lookup:symbols=6,hops=2"
    cfg = DataConfig(corpus=f"task:{spec},n=32", seq_len=64, pauses=5, prompt_targets=False)
    rows, mask = task_rows(cfg, TOK, "train")
    counts = (rows == S.pause).sum(1)
    assert counts.min() == 0 and counts.max() == 5
    task = make_task("lookup", symbols=6, hops=2)
    for row, m_row, ex in zip(rows, mask, task.examples("train", 32), strict=True):
        head = _head(ex.prompt, ex.thought)
        m = int((row == S.pause).sum())
        assert np.array_equal(row[: head.size + m], with_pauses(TOK, head, m))
        assert TOK.decode(row[head.size + m : head.size + m + 1]) == ex.answer
        assert row[head.size + m + 1] == S.eos
        assert np.all(m_row[row == S.pause] == 0) and m_row[head.size + m] == 1
        open_at = int(np.flatnonzero(row == S.think_open)[0])
        assert np.all(m_row[:open_at] == 0)  # the prompt's random letters are not targets
    emit_rows, emit_mask = task_rows(dataclasses.replace(cfg, pause_targets=True), TOK, "train")
    assert np.array_equal(emit_rows, rows)
    assert np.all(emit_mask[rows == S.pause] == 1)  # learned pausing: pauses are targets
    assert np.array_equal(emit_mask[rows != S.pause], mask[rows != S.pause])


@pytest.mark.parametrize(
    "policy",
    [Pause("fixed", m=3), Pause("confidence", threshold=1.1, cap=3),
     Pause("confidence", threshold=1.1, cap=3, per_token=True),
     Pause("entropy", threshold=-1.0, cap=2, per_token=True),
     Pause("learned", cap=2), Pause("learned", cap=2, per_token=True)],
)  # fmt: skip
def test_pauses_never_appear_in_returned_text_and_the_cap_holds(policy):
    dec = Decoder(_system(pause_lover=policy.kind == "learned"), S)
    prompt_ids = [_head("ab ba: 1 hops from a?"), _head("x")]
    res = dec.generate(prompt_ids, mode=policy, max_new_tokens=4)
    for b in range(2):
        answer = res.answer_row(b)
        assert S.pause not in answer and answer.size >= 1
        assert "<pause>" not in TOK.decode(answer, skip_special=False)
        assert "<pause>" not in answer_text(TOK, answer)
        seq = res.row(b)  # pauses and answer tokens in decision order
        assert np.array_equal(seq[seq != S.pause], answer)
        run = longest = 0
        for t in seq:  # pauses in a row before an answer token
            run = run + 1 if t == S.pause else 0
            longest = max(longest, run)
        if policy.kind == "fixed":
            assert res.pauses[b] == 3 and S.pause not in seq
        else:  # these thresholds (and the pause lover) always want a pause
            assert longest == policy.cap
            per_answer = answer.size if policy.per_token else 1
            assert res.pauses[b] == policy.cap * per_answer
            if not policy.per_token:  # all before the first answer token
                assert (seq[: policy.cap] == S.pause).all()
        assert res.passes[b] == res.pauses[b] + answer.size
    if policy.kind == "learned":  # the cap, not the policy, chose the answer tokens
        assert res.forced[0, : res.lengths[0]].sum() == res.answer_row(0).size
        assert not (res.choice & res.forced).any()  # a forced token is never a decision


def test_fixed_pauses_greedy_matches_a_full_forward():
    system = _system(seed=1)
    head = with_pauses(TOK, _head("cd dc: 1 hops from c?"), 4)
    res = Decoder(system, S).generate([head], mode=Pause("fixed", m=2), max_new_tokens=5)
    seq = list(with_pauses(TOK, head, 2))
    for _ in range(5):  # plain greedy with the whole sequence recomputed, pause never chosen
        logits, _, _ = system.main(jnp.asarray([seq]), urgency_b=jnp.zeros(1))
        seq.append(int(jnp.argmax(logits[0, -1].at[S.pause].set(-jnp.inf))))
    assert list(res.row(0)) == seq[len(head) + 2 :]


def _pause_config():
    """A program-'pause' config: the pause section and its rl section (pause rollouts)."""
    c = default_config()
    c.program = "pause"
    c.model.use_urgency = True
    c.pause = dataclasses.asdict(PauseConfig())
    c.rl = dataclasses.asdict(RLConfig(task=PauseConfig().task, rollout="pause"))
    resolve(c)
    return c


def test_bad_pause_input_is_a_clear_error():
    with pytest.raises(DecodeError, match="unknown"):
        Pause("sometimes")
    dec = Decoder(_system(), S)
    prompt = [np.arange(40) % 256]
    # 40 + 4 answer tokens + 16 pauses before each: 108 positions; 1 answer token would fit
    per_token = Pause("confidence", cap=16, per_token=True)
    with pytest.raises(DecodeError, match=r"\+ up to 64 pauses .*per_token=True.* exceeds the "
                       r"cache \(max_len=64\); allowed: max_new_tokens <= 1$"):  # fmt: skip
        dec.generate(prompt, mode=per_token, max_new_tokens=4)
    dec.generate(prompt, mode=per_token, max_new_tokens=1)
    dec.generate(prompt, mode=Pause("confidence", cap=16), max_new_tokens=4)
    with pytest.raises(DecodeError, match=r"\+ up to 21 pauses .* exceeds the cache "
                       r"\(max_len=64\); allowed: max_new_tokens <= 3$"):  # fmt: skip
        dec.generate(prompt, mode=Pause("confidence", cap=21), max_new_tokens=4)
    for section, field, value, message in [
        ("model", "use_urgency", False, "config.model.use_urgency"),
        ("pause", "rule", "vibes", "config.pause.rule"),
        ("rl", "rollout", "think", "config.rl.rollout: program 'pause' runs 'pause' rollouts"),
        ("rl", "task", "lookup:symbols=8,hops=3", "config.rl.task: must equal pause.task"),
    ]:
        c = _pause_config()
        c[section][field] = value
        with pytest.raises(ConfigError, match=message):
            resolve(c)
    c = _pause_config()
    del c.rl
    with pytest.raises(ConfigError, match="config.rl: program 'pause' needs a 'rl' section"):
        resolve(c)


def test_pause_rl_loss_sees_the_urgency_input():
    system = _system()
    system.main.urgency[...] = jnp.ones((MAIN.d_model,))
    rl_config = RLConfig(loss="reinforce", temperature=1.0, rollout="pause")
    roll = PauseRollout(system, TOK, rl_config, cap=2, max_answer=3)
    ro = roll([Example("ab ba: 1 hops from a?", "", "b")] * 2, group_size=1, seed=0)
    assert ro.urgency.tolist() == [0.0, 1.0]  # groups alternate between urgency 0 and 1
    np.testing.assert_array_equal(ro.cost, ro.urgency * ro.pauses)  # a pause costs at 1 only
    losses = []
    for u in (0.0, 1.0):  # the same rollouts, only the urgency input differs
        batch = ro.batch(np.array([1.0, 0.5]), np.ones(2, bool))
        batch = jax.tree.map(jnp.asarray, batch | {"urgency": np.full(2, u, np.float32)})
        losses.append(float(rl_loss(system, batch, rl_config, True, roll.token_logprob)[0]))
    assert losses[0] != pytest.approx(losses[1])
    assert batch["mask"].sum() > 0
    assert S.think_close in np.asarray(batch["tokens"][0])


def test_pause_rl_reference_scores_the_decision_as_the_policy_does():
    """The KL reference of pause RL scores each decision as the policy does: against itself the
    k3 KL is exactly 0 (scoring the reference by its answer token would not be)."""
    system = _system()
    rl_config = RLConfig(loss="reinforce", temperature=1.0, rollout="pause", kl_coef=0.1)
    roll = PauseRollout(system, TOK, rl_config, cap=2, max_answer=3)
    ro = roll([Example("ab ba: 1 hops from a?", "", "b")] * 4, group_size=2, seed=0)
    batch = jax.tree.map(jnp.asarray, ro.batch(np.array([1.0, -1.0, 0.5, -0.5]), np.ones(4, bool)))
    graphdef, state = nnx.split(system)
    for token_logprob, zero in ((roll.token_logprob, True), (None, False)):
        _, reference = jit_rl_steps(graphdef, graphdef, rl_config, "both", token_logprob)
        ref_lp, _ = reference(state, batch)
        metrics = rl_loss(system, batch | {"ref_lp": ref_lp}, rl_config, True,
                          roll.token_logprob)[1][0]  # fmt: skip
        assert (float(metrics["kl_ref"]) == 0.0) == zero


def test_learned_pauses_are_sampled_decisions_with_greedy_answers():
    """RL's rollouts: pause-or-go-on drawn at temperature 1, answer tokens greedy, and the
    loss scores the decision (log 1/2 either way here), not the answer token."""
    system = _system()
    system.main = CoinFlipPauser(MAIN, rngs=nnx.Rngs(0))
    cap = 4
    roll = PauseRollout(system, TOK, RLConfig(temperature=1.0, rollout="pause"), cap=cap,
                        max_answer=3)  # fmt: skip
    assert roll.policy == Pause("learned", cap=cap, temperature=1.0)
    ro = roll([Example("12*34=", "", "408")] * 16, group_size=16, seed=0)
    assert len(set(ro.pauses.tolist())) > 1  # sampled decisions differ between rows
    batch = jax.tree.map(jnp.asarray, ro.batch(np.zeros(16), np.ones(16, bool)))
    tokens, mask = batch["tokens"], np.asarray(batch["mask"]) > 0
    dist, _ = token_dists(*system(tokens, batch["urgency"]), batch["offset"], 1.0)
    at = np.arange(tokens.shape[1]) - _head("12*34=").size
    generated = (at >= 0) & (at < ro.generated[:, None])
    answer = generated & (np.asarray(tokens) != S.pause)
    # decisions: every pause, then the first answer token unless the cap chose it; later
    # answer tokens are not
    np.testing.assert_array_equal(mask.sum(1), ro.pauses + (ro.pauses < cap))
    assert (ro.pauses == cap).any()
    greedy = np.asarray(dist.at[..., S.pause].set(-jnp.inf).argmax(-1))
    np.testing.assert_array_equal(np.asarray(tokens)[answer], greedy[answer])
    lp = np.asarray(token_stats(system, batch, 1.0, roll.token_logprob)[0])
    np.testing.assert_allclose(lp[mask], np.log(0.5), atol=1e-4)
    token_lp = np.asarray(token_stats(system, batch, 1.0)[0])
    assert (token_lp[answer & mask] < np.log(0.5) - 0.1).all()  # not the answer token's lp


def test_think_mode_answers_after_the_thought_with_pauses():
    dec = Decoder(_system(seed=2), S)
    prompts = [encode_prompt(TOK, "ab ba: 1 hops from a?")] * 2
    policy = Pause("fixed", m=4)
    th = think_then_answer(dec, prompts, thought_mode="fast", think_budget=2,
                           answer_mode=policy, answer_max_tokens=3)  # fmt: skip
    for b in range(2):  # 2 fast passes: at most 2 * (1 + k) = 6 thought tokens
        assert th.thoughts[b][-1] == S.think_close and th.thoughts[b].size <= 7
        assert S.pause not in th.answer.answer_row(b) and th.answer.pauses[b] == 4
    alone = dec.generate([np.concatenate([prompts[0], th.thoughts[0]])], mode=policy,
                         max_new_tokens=3)  # fmt: skip
    assert np.array_equal(alone.answer_row(0), th.answer.answer_row(0))


def test_pause_pipeline_writes_the_report_and_skips_finished_phases(tmp_path):
    """experiments/pause.py:smoke end to end: three models, the report, then a re-run that
    trains nothing (every phase has its checkpoint)."""
    path = pathlib.Path(__file__).parent.parent / "experiments" / "pause.py"
    spec = importlib.util.spec_from_file_location("pause_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = resolve(module.get_config("smoke"))
    assert run.program == "pause" and run.rl.rollout == "pause"
    out = run_pause(run, tmp_path, TOK)
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
    phases = [tmp_path / name for name in ("plain", "paused", "learned_emit", "learned")]
    assert all((d / "checkpoints").is_dir() for d in phases)
    touched = lambda: {p: p.stat().st_mtime_ns for d in phases for p in d.rglob("*")}
    before = touched()
    run_pause(run, tmp_path, TOK)  # every phase is skipped: nothing in their directories changes
    assert touched() == before


def test_pause_decision_gradient_moves_only_the_pause_logit():
    logits = jax.random.normal(jax.random.key(0), (1, 3, 264)) * 3
    given_lp = jnp.full((1, 3), -7.0)
    batch = {"tokens": jnp.array([[S.pause, 65, 66]]), "decision": jnp.array([[1, 1, 0]]),
             "pause_id": S.pause}  # fmt: skip
    lp = pause_decision_logprob(logits, batch, given_lp, 1.0)
    p = jax.nn.softmax(logits)[..., S.pause]
    want = jnp.array([[jnp.log(p[0, 0]), jnp.log(1 - p[0, 1]), -7.0]])  # no decision: as given
    np.testing.assert_allclose(lp, want, atol=1e-6)
    grad = jax.grad(lambda z: pause_decision_logprob(z, batch, given_lp, 1.0).sum())(logits)
    others = np.asarray(grad).copy()
    others[..., S.pause] = 0
    assert np.abs(others).max() == 0.0
    assert (np.abs(np.asarray(grad[0, :2, S.pause])) > 0).all() and grad[0, 2, S.pause] == 0


def test_report_findings_are_computed_from_the_reports_numbers():
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
