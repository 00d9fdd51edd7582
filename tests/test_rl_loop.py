"""Rollouts through the engine, bad rewards, and the warm-up -> RL pipeline end to end."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, RLConfig, default_config, resolve
from mtp.data.format import encode_prompt
from mtp.data.tasks import Example, make_task
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.decode.sampling import Sampling
from mtp.decode.thinking import think_then_answer
from mtp.errors import UserError
from mtp.evals import rl_report
from mtp.evals.task_accuracy import drafts_agree
from mtp.metrics import read_csv
from mtp.model.system import MTPSystem
from mtp.programs import rl as rl_program
from mtp.rl.advantages import ADVANTAGES
from mtp.rl.objectives import token_dists
from mtp.rl.rollouts import ThinkRollout, score_rollouts
from mtp.rl.selection import (
    RewardError,
    group_advantages,
    informative_first,
    step_problems,
    update_hard,
)
from mtp.rl.steps import jit_rl_steps, rl_optimizer

K = 2
TOK = ByteTokenizer()
CLOSE = TOK.specials.think_close
# The same model and shapes as the pipeline test's, so the compiled decoders are shared.
MAIN = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_len=64)
PROMPTS = ["12+34=", "12+34=", "56+78=", "56+78="]
PROBLEMS = [Example(p, "", "") for p in PROMPTS]
GREEDY = Sampling()


def think_rollout(system, think_budget=3, rl_config=None):
    """Think rollouts of `system` (`rl_config`'s, default RLConfig()): thoughts within
    `think_budget` passes, answers of up to 4 tokens."""
    rl_config = dataclasses.replace(
        rl_config or RLConfig(), think_budget=think_budget, answer_max_tokens=4
    )
    return ThinkRollout(system, TOK, rl_config)


@pytest.fixture(scope="module")
def roll():
    system = MTPSystem(
        MAIN, DrafterConfig(k=K, n_heads=2), pad_id=TOK.specials.pad, rngs=nnx.Rngs(0)
    )
    return system, think_rollout(system)


def test_rollout_tokens_are_what_their_pass_would_emit(roll):
    """Greedy fast thought: each token is the argmax of the distribution the RL loss scores."""
    system, r = roll
    ro = r(PROBLEMS, thought_mode="fast", sampling=GREEDY)
    assert (ro.thought_passes <= 3).all()
    after_close = np.arange(ro.tokens.shape[1]) > np.argmax(ro.tokens == CLOSE, 1)[:, None]
    answer_tokens = (ro.mask * after_close).sum(1)  # one slow pass each
    np.testing.assert_array_equal(ro.passes, ro.thought_passes + answer_tokens)
    logits_btv, draft_btkv = system(jnp.asarray(ro.tokens))
    dist_btv, _ = token_dists(logits_btv, draft_btkv, jnp.asarray(ro.offset), 1.0)
    m = ro.mask > 0
    np.testing.assert_array_equal(np.asarray(dist_btv.argmax(-1))[m], ro.tokens[m])
    # fast passes emit 1 + k tokens (the last may stop at </think>); offsets 0..k
    thought = m & (np.arange(ro.tokens.shape[1]) < np.argmax(ro.tokens == CLOSE, 1)[:, None])
    assert set(np.unique(ro.offset[thought])) <= set(range(K + 1))
    assert ro.offset.max() == K


def test_drafts_agree_is_every_draft_equal_to_the_main_greedy_token(roll):
    system, _ = roll
    dec = Decoder(system, TOK.specials)
    prompt_ids = [encode_prompt(TOK, p.prompt) for p in PROBLEMS * 2]

    def thoughts(mode, sampling, seed=0):
        return think_then_answer(dec, prompt_ids, thought_mode=mode, think_budget=4,
                                 answer_max_tokens=4, sampling=sampling, seed=seed)  # fmt: skip

    th = thoughts("fast", Sampling(temperature=1.0), seed=3)
    want = []
    for b, (h, t) in enumerate(zip(th.prompt_ids, th.thoughts, strict=True)):
        row = np.concatenate([h, t])
        logits_btv, _ = system(jnp.asarray(row[None]))
        main_next_t = np.asarray(logits_btv[0].argmax(-1))  # main's choice for token t + 1
        n = int(th.thought.lengths[b])
        drafted = h.size + np.flatnonzero(th.thought.offset[b, :n] > 0)
        want.append(all(row[t] == main_next_t[t - 1] for t in drafted))
    got = drafts_agree(system, th, TOK.specials.pad)
    np.testing.assert_array_equal(got, want)
    assert not got.all()  # an untrained drafter disagrees somewhere
    slow = thoughts("slow", GREEDY)
    assert drafts_agree(system, slow, TOK.specials.pad).all()  # no drafts
    # a slow greedy thought is the main model's own choice at every token: labelled as drafts it
    # agrees everywhere, until one of its tokens is changed
    n = slow.thought.lengths
    assert (n >= 3).all()
    slow.thought.offset = slow.thought.offset.copy()
    slow.thought.offset[:, 1:3] = 1
    slow.thoughts[1] = slow.thoughts[1].copy()
    slow.thoughts[1][1] = (slow.thoughts[1][1] + 1) % 256
    assert drafts_agree(system, slow, TOK.specials.pad).tolist() == [True, False] + [True] * 6


def test_learned_rollouts_mark_stops_and_price_passes_by_urgency():
    """Keep head at p(keep) = 0.5: thought passes of several lengths, each shorter than 1 + K
    marked as stopped after its last token; groups alternate urgency 0 / 1, the cost is
    urgency x main passes."""
    cfg = DrafterConfig(k=K, n_heads=2, emission=True)
    system = MTPSystem(MAIN, cfg, pad_id=TOK.specials.pad, rngs=nnx.Rngs(0))
    system.drafter.keep.bias.set_value(jnp.zeros((1,)))
    rc = RLConfig(thought_mode="learned", urgency=True, group_size=2, pass_price=0.1)
    ro = think_rollout(system, think_budget=8, rl_config=rc)(PROBLEMS, group_size=2, seed=0)
    assert ro.urgency.tolist() == [0, 0, 1, 1]
    np.testing.assert_array_equal(ro.cost, ro.urgency * ro.passes)
    sizes = []
    for b in range(len(PROBLEMS)):
        thought = (ro.mask[b] > 0) & (
            np.arange(ro.tokens.shape[1]) < np.argmax(ro.tokens[b] == CLOSE)
        )
        ids = ro.pass_[b][thought]
        for p in np.unique(ids)[:-1]:  # the last may be cut by </think> or the budget
            stops = ro.stop[b][thought][ids == p]
            assert stops[:-1].sum() == 0 and stops[-1] == (stops.size < K + 1)
            sizes.append(stops.size)
    assert len(set(sizes)) >= 2, sizes
    assert "stop" in ro.batch(np.zeros(4), np.ones(4, bool))
    scored = score_rollouts(ro, lambda prompt, answer: 1.0, pass_price=0.1)
    np.testing.assert_allclose(scored.rewards, 1.0 - 0.1 * ro.urgency * ro.passes)


def test_rollout_budget_forces_think_close_and_masks_it(roll):
    _, r = roll
    ro = r(PROBLEMS, thought_mode="slow", sampling=GREEDY)
    assert (ro.thought_passes <= 3).all() and ro.forced_close.any()  # random weights never close
    for i in np.flatnonzero(ro.forced_close):
        close = np.flatnonzero(ro.tokens[i] == CLOSE)
        assert ro.mask[i, close[-1]] == 0  # the policy did not sample it


def _scored(roll, score):
    _, r = roll
    ro = r(PROBLEMS, thought_mode="fast", sampling=Sampling(temperature=1.0), seed=1)
    return score_rollouts(ro, score)


@pytest.mark.parametrize("failure", ["raise", "nan"])
def test_bad_reward_drops_its_group_with_a_log_line(roll, failure):
    def score(prompt, answer):
        if prompt == "56+78=":
            if failure == "raise":
                raise RuntimeError("verifier broke")
            return float("nan")
        return 1.0

    ro = _scored(roll, score)
    assert ro.bad.tolist() == [False, False, True, True]
    lines = []
    adv, keep = group_advantages(ro, 2, RLConfig(), log=lines.append)
    assert keep.tolist() == [True, True, False, False]
    assert np.isfinite(adv).all() and (adv[2:] == 0).all()
    assert lines and "skipped a group" in lines[0]
    assert ("verifier broke" if failure == "raise" else "nan") in lines[0]
    batch = ro.batch(adv, keep)
    assert batch["mask"][2:].sum() == 0 and batch["mask"][:2].sum() > 0

    with pytest.raises(RewardError, match="on_bad_reward"):
        group_advantages(ro, 2, RLConfig(on_bad_reward="error"))


def test_partial_credit_is_the_reward_and_accuracy_stays_exact(roll):
    _, r = roll
    ro = r(PROBLEMS, thought_mode="fast", sampling=Sampling(temperature=1.0), seed=1)
    ro = score_rollouts(ro, lambda p, a: 0.0, pass_price=0.01, credit=lambda p, a: 0.5)
    assert ro.stats()["accuracy"] == 0.0
    np.testing.assert_allclose(ro.rewards, 0.5 - 0.01 * ro.passes)


def _tiny_config(tmp_path):
    c = default_config()
    c.program = "rl"
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_len=64)
    c.drafter.update(k=K, n_heads=2)
    c.data.update(corpus="task:addition:digits=2,n=200", seq_len=32, batch_size=4)
    c.train.update(steps=4, warmup_steps=1, log_every=2, eval_every=4, eval_batches=1,
                   checkpoint_every=4)  # fmt: skip
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(task="addition:digits=2", trainable=("both",), steps=2, prompts_per_step=2,
                group_size=2, think_budget=3, answer_max_tokens=4, log_every=1,
                eval_every=2, eval_prompts=4, checkpoint_every=1, max_skipped_steps=2)  # fmt: skip
    return c


def test_pipeline_runs_warmup_then_rl_and_resumes(tmp_path, capsys, monkeypatch):
    c = _tiny_config(tmp_path)
    c.rl.update(steps=1, oversample=2, replay=0.5, reward="partial", distill=0.5)  # end to end
    c.drafter.detach = True  # a Medusa-style warm-up: the drafter's loss never reaches the main
    run = resolve(c)
    rl_program.run_rl(run, tmp_path, TOK)
    assert not rl_program.rl_policy(tmp_path / "warmup", run).detach  # joint RL reaches it
    detached = run.replace(rl=dataclasses.replace(run.rl, detach=True))
    assert rl_program.rl_policy(tmp_path / "warmup", detached).detach
    c.rl.steps = 2  # the RL phase resumes from its step-1 checkpoint
    out = rl_program.run_rl(resolve(c), tmp_path, TOK)
    assert set(out) == {"warmup_slow", "warmup_fast", "rl_both"}
    assert 0.0 <= out["rl_both"]["accuracy"] <= 1.0
    rows = read_csv(tmp_path / "rl_both", "rl_both")
    assert [r["step"] for r in rows] == [1, 2]
    for name in ("reward", "accuracy", "passes", "tokens_per_pass", "kl_ref", "entropy", "agree",
                 "trained_groups_with_signal", "hard_problems", "distill_kl"):  # fmt: skip
        assert np.isfinite(rows[-1][name]), name
    assert (tmp_path / "rl_summary.md").exists()
    text = rl_report.report(tmp_path, n=4, budgets=(2, 0), batch_size=4, taus=(0.9,))
    assert "| slow | 2 |" in text and "| fast/rl_both | none | - |" in text and "check" in text
    assert "| fast/rl_both | none | 1 |" in text  # the fixed-length baseline, 1 draft per pass
    assert "| adaptive/rl_both | none | - | 0.9 |" in text
    assert re.search(r"check: (no )?adaptive/rl_both", text), text
    assert rl_report.pareto([(3, 0.9), (1, 0.5), (2, 0.4), (1, 0.2)]) == [(1, 0.5), (3, 0.9)]
    assert (tmp_path / "rl_report.png").stat().st_size > 0
    rows = json.loads((tmp_path / "rl_report.json").read_text())
    for row in rows:  # drafts-agree columns: drafting modes only; acc = the split's weighted mean
        assert ("drafts_agree" in row) == (row["system"] != "slow"), row
        if "drafts_agree" in row:
            parts = [(row["drafts_agree"], row["accuracy_if_agree"]),
                     (1 - row["drafts_agree"], row["accuracy_if_not"])]  # fmt: skip
            acc = sum(w * a for w, a in parts if w > 0)
            assert acc == pytest.approx(row["accuracy"], abs=1e-6), row
    capsys.readouterr()
    rl_program.run_rl(resolve(c), tmp_path, TOK)  # finished phases are skipped, not redone
    assert len(read_csv(tmp_path / "rl_both", "rl_both")) == 2
    assert "rl_both:" not in capsys.readouterr().err

    # a verifier that always fails: logged skips, then a clear stop
    broken = make_task("addition", digits=2)

    class Broken(type(broken)):
        def score(self, prompt, answer):
            raise ValueError("no verifier today")

    c.rl.steps = 4
    monkeypatch.setattr(rl_program, "parse_task_spec", lambda spec: (Broken(digits=2), 1))

    def arm(c):
        return rl_program.train_arm(
            resolve(c), tmp_path / "rl_both", tmp_path / "warmup", "both", TOK
        )

    with pytest.raises(UserError, match="2 steps in a row had no usable rollout"):
        arm(c)
    c.rl.on_bad_reward = "error"
    with pytest.raises(RewardError, match="no verifier today"):
        arm(c)


def test_rl_steps_raise_the_reward_of_a_toy_objective(roll):
    """Reward = share of drafted thought tokens below 128 (about half at random init).

    Fifteen GRPO/PPO steps must raise it by far more than sampling noise: the whole
    loop (rollout -> advantages -> clipped update -> new weights in the engine) learns.
    """
    system, _ = roll
    system = nnx.clone(system)
    rl_config = RLConfig(lr=1e-2, warmup_steps=1, ppo_epochs=2, group_size=4)
    graphdef, state = nnx.split((system, rl_optimizer(system, rl_config, "both")))
    state = jax.tree.map(jnp.copy, state)  # donated below: keep the module fixture's arrays
    step, _ = jit_rl_steps(graphdef, nnx.graphdef(system), rl_config, "both")
    r = think_rollout(system, rl_config=rl_config)
    problems = PROBLEMS * 2  # two groups of four

    def reward(ro):
        drafted = (ro.mask > 0) & (ro.offset > 0)
        return ((ro.tokens < 128) & drafted).sum(1) / np.maximum(drafted.sum(1), 1)

    means = []
    for i in range(15):
        r.set_weights(nnx.merge(graphdef, state)[0])
        ro = r(problems, thought_mode="fast", sampling=Sampling(temperature=1.0), seed=i)
        rewards = reward(ro)
        means.append(rewards.mean())
        adv = ADVANTAGES["grpo"](rewards.reshape(-1, 4)).reshape(-1)
        batch = {k: jnp.asarray(v) for k, v in ro.batch(adv, np.ones(8, bool)).items()}
        for epoch in range(2):
            state, _, lp = step(state, batch, epoch == 0)
            batch["old_lp"] = lp
    assert np.mean(means[-3:]) > np.mean(means[:2]) + 0.2, means


def test_informative_groups_are_trained_first(roll):
    """With oversampling, groups whose rewards differ fill the batch before equal-reward ones."""
    ro = _scored(roll, lambda prompt, answer: 1.0)
    ro.rewards = np.array([1.0, 1.0, 0.0, 1.0])  # group 0 equal, group 1 informative
    kept = informative_first(ro, 2, 1)
    assert kept.prompts == ["56+78=", "56+78="]
    np.testing.assert_array_equal(kept.rewards, [0.0, 1.0])
    np.testing.assert_array_equal(kept.tokens, ro.tokens[2:])
    # fewer informative groups than the batch holds: topped up, same shape
    both = informative_first(ro, 2, 2)
    assert both.prompts == ["56+78=", "56+78=", "12+34=", "12+34="]


def test_hard_problems_are_replayed_until_every_rollout_solves_them():
    task = make_task("addition", digits=2)
    fresh = task.examples("train", 4, start=8)
    assert all(isinstance(ex, Example) and ex.answer for ex in fresh)
    assert step_problems(task, 2, 4, [], 2) == fresh  # nothing hard yet
    hard = update_hard([], fresh, np.array([[1, 1], [1, 0], [0, 0], [1, np.nan]]), cap=8)
    assert hard == fresh[1:]  # solved by both rollouts: not kept
    step3 = step_problems(task, 3, 4, hard, 2)
    assert step3[:2] == fresh[1:3] and step3[2:] == task.examples("train", 2, start=12)
    # replayed and solved: leaves; replayed and failed: to the back; the cap keeps the newest
    hard = update_hard(hard, step3[:2], np.array([[1, 1], [0, 1]]), cap=8)
    assert hard == [fresh[3], fresh[2]]
    x, y = Example("x", "", ""), Example("y", "", "")
    assert update_hard(hard, [x, y], np.zeros((2, 2)), cap=3) == [fresh[2], x, y]
