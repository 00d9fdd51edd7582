"""`run_pipeline(config, workdir)`: supervised warm-up, then RL, every phase resumable.

    WORKDIR/warmup/         the supervised run (`train_and_evaluate`, data.corpus 'task:...')
    WORKDIR/rl_<trainable>/ one RL run per entry of rl.trainable, each started from
                            the warm-up's last checkpoint; its frozen copy is the
                            KL reference
    WORKDIR/rl_summary.md   greedy held-out accuracy and passes of every phase

Running the same command again skips finished phases and resumes the others
from their last checkpoint. An RL step: draw `prompts_per_step` train problems
(fixed by the step number, so a resumed run sees the same ones), decode
`group_size` rollouts of each in think mode (`rl_rollout`), score them, turn
rewards into advantages per group (with `rl.oversample` > 1: draw that many
times the problems and train on the groups whose rewards differ; with
`rl.replay` > 0, that share of the problems are earlier ones not yet solved by
every rollout), then `ppo_epochs` updates on the batch
(`rl.rl_step`). Bad rewards (a verifier that raises, a NaN) drop their group
with a logged line, or stop the run (`rl.on_bad_reward='error'`); a step left
with no usable group is skipped and logged, and `max_skipped_steps` of those
in a row stop the run. A NaN loss stops it with the last good checkpoint kept.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import RLConfig, UserError, validate
from mtp.data.task_data import parse_task_spec
from mtp.decode.sampling import Sampling
from mtp.evals.task_accuracy import TaskAccuracy
from mtp.metrics import MetricWriter, format_table, is_main_process, progress
from mtp.train.loop import NonFiniteLoss, sigterm_flag, train_and_evaluate
from mtp.train.rl import ADVANTAGES, jit_rl_steps, rl_optimizer
from mtp.train.rl_rollout import Rollouts, ThinkRollout, score_rollouts


class RewardError(UserError):
    """A verifier raised or returned a non-finite reward and rl.on_bad_reward='error'."""


def group_advantages(ro: Rollouts, group_size: int, rc: RLConfig, log=print):
    """(adv_b, keep_b) from scored rollouts; groups holding a bad rollout are dropped.

    Raises RewardError on a bad rollout when rl.on_bad_reward is 'error'.
    """
    b = len(ro.prompts)
    if b == 0 or b % group_size:
        raise UserError(f"RL batch of {b} rollouts is not a whole number of groups of {group_size}")
    if ro.bad.any():
        if rc.on_bad_reward == "error":
            raise RewardError(f"{ro.errors[0]}; set rl.on_bad_reward='skip' to drop such groups")
        for e in ro.errors[:3]:
            log(f"rl: skipped a group: {e}")
    bad_g = ro.bad.reshape(-1, group_size).any(1)
    rewards_gn = np.where(bad_g[:, None], 0.0, ro.rewards.reshape(-1, group_size))
    adv = ADVANTAGES[rc.advantage](rewards_gn)
    keep = np.repeat(~bad_g, group_size)
    return np.where(keep, adv.reshape(-1), 0.0).astype(np.float32), keep


def step_prompts(task, step: int, n: int, hard: list[str], n_replay: int) -> list[str]:
    """The `n` problems of an RL step: the first `n_replay` hard ones, then fresh train ones.

    Fresh problems are fixed by the step number (a resumed run sees the same)."""
    replay = hard[:n_replay]
    fresh = task.examples("train", n - len(replay), start=step * n)
    return replay + [ex.prompt for ex in fresh]


def update_hard(hard: list[str], prompts: list[str], scores_gn: np.ndarray, cap: int) -> list[str]:
    """The hard-problem queue after a step: solved problems leave, unsolved go to the back.

    `prompts` (G,) and `scores_gn` (G, N): a problem is solved when every one
    of its N rollouts scored 1 (NaN: a bad rollout, counts as unsolved).
    """
    unsolved = [p for p, s in zip(prompts, scores_gn, strict=True) if not (s >= 1).all()]
    seen = set(prompts)
    return ([p for p in hard if p not in seen] + unsolved)[-cap:]


def informative_first(ro: Rollouts, group_size: int, n_groups: int) -> Rollouts:
    """`n_groups` groups of `ro`: those whose rewards differ (and have no bad rollout) first.

    Equal rewards give a group zero advantage, hence no policy gradient; with
    rl.oversample > 1 the loop decodes more groups than it trains on and keeps
    the informative ones (DAPO's dynamic sampling, Yu et al. 2025). The batch
    keeps its shape (fewer informative groups are topped up with the others).
    """
    rewards_gn = np.nan_to_num(ro.rewards).reshape(-1, group_size)
    useful_g = (rewards_gn.std(1) > 0) & ~ro.bad.reshape(-1, group_size).any(1)
    order = np.argsort(~useful_g, kind="stable")[:n_groups]
    rows = (order[:, None] * group_size + np.arange(group_size)).reshape(-1)
    return ro.select(rows)


def _phase_done(workdir: Path, steps: int) -> bool:
    if not (workdir / "checkpoints").exists():
        return False
    mngr = ckpt.manager(workdir)
    try:
        return (mngr.latest_step() or 0) >= steps
    finally:
        mngr.close()


def load_rl_system(workdir, init_dir=None):
    """The system of an RL run directory (latest checkpoint) and its config."""
    workdir = Path(workdir)
    config = ckpt.read_config(workdir)
    cs = validate(config)
    trainable = workdir.name.removeprefix("rl_")
    init_dir = Path(init_dir) if init_dir else workdir.parent / "warmup"
    system, _ = ckpt.load_system(init_dir)
    graphdef, state = nnx.split((system, rl_optimizer(system, cs.rl, trainable)))
    mngr = ckpt.manager(workdir)
    step = mngr.latest_step()
    if step is None:
        raise UserError(f"{workdir}: no RL checkpoint yet; run the pipeline there first")
    state, _ = ckpt.restore(mngr, step, ckpt.abstract(state))
    mngr.close()
    return nnx.merge(graphdef, state)[0], config


def rl_policy(init_dir, rc: RLConfig):
    """The warm-up's system as RL starts it: taps detached or not by `rl.detach`, not the warm-up's
    `drafter.detach`, so joint RL can teach a main model the drafter never trained to talk."""
    system, _ = ckpt.load_system(init_dir)
    system.detach = rc.detach
    return system


def _evaluate(rc: RLConfig, roll: ThinkRollout, task, thought_mode: str | None = None):
    ev = TaskAccuracy(
        task, rc.eval_prompts, thought_mode=thought_mode or rc.thought_mode,
        think_budget=rc.think_budget, answer_max_tokens=rc.answer_max_tokens,
        batch_size=rc.prompts_per_step * rc.group_size,
    )  # fmt: skip
    return dict(ev.run(roll))


def train_rl(config, workdir, init_dir, trainable: str) -> dict:
    """One RL run in `workdir` from the system in `init_dir`; resumes. Returns the final eval."""
    cs = validate(config)
    rc = cs.rl
    workdir = Path(workdir)
    task, _ = parse_task_spec(rc.task)
    ckpt.check_compatible(config, workdir)
    init_system = rl_policy(init_dir, rc)
    if is_main_process():
        ckpt.write_config(config, workdir)
    ref_graphdef, ref_state = nnx.split(init_system)
    ref_state = jax.tree.map(jnp.copy, ref_state)  # the train state below is donated
    graphdef, state = nnx.split((init_system, rl_optimizer(init_system, rc, trainable)))
    mngr = ckpt.manager(workdir, rc.keep_checkpoints)
    step = mngr.latest_step() or 0
    info = {"step": 0, "skipped_steps": 0, "bad_rollouts": 0}
    if step:
        state, info = ckpt.restore(mngr, step, ckpt.abstract(state))
    rl_step, ref_logprobs = jit_rl_steps(graphdef, ref_graphdef, rc, trainable)
    roll = ThinkRollout(nnx.merge(graphdef, state)[0])
    writer = MetricWriter(workdir)
    key = jax.random.key(cs.seed)
    sampling = Sampling(temperature=rc.temperature)
    log = lambda msg: is_main_process() and print(msg, flush=True)
    n_prompts, g = rc.prompts_per_step, rc.group_size
    acc_m: dict[str, float] = {}
    acc_n, skipped_in_row, results = 0, 0, {}
    hard = list(info.get("hard", []))  # train problems not yet solved by every rollout
    credit = task.partial_score if rc.reward == "partial" else None  # reward, if not score
    try:
        with sigterm_flag() as preempted, progress(rc.steps, step, f"rl_{trainable}") as bar:
            t0 = time.perf_counter()
            while step < rc.steps:
                system = nnx.merge(graphdef, state)[0]
                roll.set_weights(system)
                n_draw = n_prompts * rc.oversample
                problems = step_prompts(task, step, n_draw, hard, round(rc.replay * n_draw))
                prompts = [p for p in problems for _ in range(g)]
                ro = roll(
                    prompts, thought_mode=rc.thought_mode, think_budget=rc.think_budget,
                    answer_max_tokens=rc.answer_max_tokens, sampling=sampling,
                    seed=jax.random.fold_in(key, step),
                )  # fmt: skip
                ro = score_rollouts(ro, task.score, rc.pass_price, credit)
                spread = np.nan_to_num(ro.rewards).reshape(-1, g).std(1) > 0
                stats = ro.stats() | {"groups_with_signal": float(spread.mean())}
                info["bad_rollouts"] += int(ro.bad.sum())
                if rc.replay:
                    hard = update_hard(hard, problems, ro.scores.reshape(-1, g), rc.replay_size)
                    info["hard"] = hard
                    stats["hard_problems"] = len(hard)
                if rc.oversample > 1:
                    ro = informative_first(ro, g, n_prompts)
                    stats["trained_groups_with_signal"] = (
                        min(int(spread.sum()), n_prompts) / n_prompts
                    )
                adv, keep = group_advantages(ro, g, rc, log)
                step += 1
                bar.update(1)
                if not keep.any() or ro.mask[keep].sum() == 0:
                    info["skipped_steps"] += 1
                    skipped_in_row += 1
                    log(f"rl: step {step} skipped: no usable rollout in the batch")
                    if skipped_in_row >= rc.max_skipped_steps:
                        raise UserError(
                            f"rl: {skipped_in_row} steps in a row had no usable rollout "
                            f"(last: {ro.errors[0] if ro.errors else 'empty batch'}); stopped"
                        )
                    continue
                skipped_in_row = 0
                batch = {k: jnp.asarray(v) for k, v in ro.batch(adv, keep).items()}
                batch["ref_lp"], teacher = ref_logprobs(ref_state, batch["tokens"], batch["offset"])
                if teacher is not None:  # rl.distill
                    batch["teacher"] = teacher
                for epoch in range(rc.ppo_epochs):
                    state, m, lp = rl_step(state, batch, epoch == 0)
                    if epoch == 0:
                        batch["old_lp"] = lp
                        first = m
                m = jax.device_get(first) | {
                    f"last_{n}": v for n, v in jax.device_get(m).items() if n.startswith("ratio")
                }
                if not np.isfinite(m["loss"]):
                    raise NonFiniteLoss(
                        f"rl loss is {m['loss']} at step {step} (grad_norm={m['grad_norm']:.4g}); "
                        "stopped, last good checkpoint kept. Lower rl.lr"
                    )
                m |= stats
                for name, v in m.items():
                    acc_m[name] = acc_m.get(name, 0.0) + float(v)
                acc_n += 1
                if step % rc.log_every == 0 or step == rc.steps:
                    means = {n: v / acc_n for n, v in acc_m.items()}
                    dt = time.perf_counter() - t0
                    means["s_per_step"] = dt / acc_n
                    acc_m, acc_n, t0 = {}, 0, time.perf_counter()
                    writer.write(f"rl_{trainable}", step, means)
                    bar.set_postfix(
                        reward=f"{means['reward']:.3f}", acc=f"{means['accuracy']:.2f}",
                        passes=f"{means['passes']:.1f}", tok_pass=f"{means['tokens_per_pass']:.2f}",
                        kl=f"{means['kl_ref']:.3f}", agree=f"{means['agree']:.2f}",
                    )  # fmt: skip
                if step % rc.checkpoint_every == 0 or step == rc.steps or preempted["set"]:
                    ckpt.save(mngr, step, state, info | {"step": step}, force=preempted["set"])
                if step % rc.eval_every == 0 or step == rc.steps:
                    roll.set_weights(nnx.merge(graphdef, state)[0])
                    results = _evaluate(rc, roll, task)
                    writer.write(f"rl_{trainable}_eval", step, results)
                if preempted["set"]:
                    mngr.wait_until_finished()
                    log(f"SIGTERM: saved RL step {step} to {workdir}; rerun the command to resume")
                    return results
        if not results:
            roll.set_weights(nnx.merge(graphdef, state)[0])
            results = _evaluate(rc, roll, task)
        return results
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()


def run_pipeline(config, workdir) -> dict:
    """Warm-up, then one RL run per rl.trainable; returns {phase: greedy eval}."""
    cs = validate(config)
    if cs.rl is None:
        raise UserError("config has no 'rl' section; use train_and_evaluate for supervised runs")
    workdir = Path(workdir)
    ckpt.check_compatible(config, workdir)
    if is_main_process():
        ckpt.write_config(config, workdir)
    warm = workdir / "warmup"
    ran = False  # did this call train anything (then the summary is stale)
    if not _phase_done(warm, cs.train.steps):
        ran = True
        train_and_evaluate(config, warm)
        if not _phase_done(warm, cs.train.steps):  # stopped by SIGTERM: resume later
            return {}
    for trainable in cs.rl.trainable:
        arm = workdir / f"rl_{trainable}"
        if not _phase_done(arm, cs.rl.steps):
            ran = True
            train_rl(config, arm, warm, trainable)
            if not _phase_done(arm, cs.rl.steps):
                return {}
    saved = workdir / "rl_summary.json"
    if saved.exists() and not ran:  # everything finished before: show the saved summary
        print((workdir / "rl_summary.md").read_text())
        return json.loads(saved.read_text())
    return summarize(config, workdir)


def summarize(config, workdir) -> dict:
    """Greedy held-out accuracy and passes of the warm-up (slow and fast) and every RL run."""
    cs = validate(config)
    rc = cs.rl
    task, _ = parse_task_spec(rc.task)
    workdir = Path(workdir)
    warm_system, _ = ckpt.load_system(workdir / "warmup")
    rows, out = [], {}
    roll = ThinkRollout(warm_system)
    for mode in ("slow", "fast"):
        out[f"warmup_{mode}"] = _evaluate(rc, roll, task, thought_mode=mode)
    for trainable in rc.trainable:
        system, _ = load_rl_system(workdir / f"rl_{trainable}", workdir / "warmup")
        roll.set_weights(system)
        out[f"rl_{trainable}"] = _evaluate(rc, roll, task)
    for name, r in out.items():
        rows.append([name, r["accuracy"], r["passes"], r["thought_passes"], r["tokens_per_pass"]])
    table = format_table(rows, ["system", "accuracy", "passes", "thought passes", "tokens/pass"])
    text = (
        f"## RL summary: {rc.task}, {rc.eval_prompts} held-out problems, greedy, "
        f"think budget {rc.think_budget or 'none'}\n\n{table}\n"
    )
    if is_main_process():
        print(text)
        (workdir / "rl_summary.md").write_text(text)
        (workdir / "rl_summary.json").write_text(json.dumps(out, indent=2))
    return out
