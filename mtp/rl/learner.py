"""`train_rl`: the one RL loop, for every rollout kind; resumable from its workdir.

An RL step: draw `prompts_per_step` train problems (fixed by the step number,
so a resumed run sees the same; with `rl.oversample` > 1 that many times more;
with `rl.replay` > 0 that share are earlier problems not yet solved by every
rollout), decode `group_size` rollouts of each with the rollout kind
(`mtp.rl.rollouts`), score them, turn rewards into advantages per group (with
oversampling, train on the groups whose rewards differ), then `ppo_epochs`
updates on the batch. Bad rewards (a verifier that raises, a NaN) drop their
group with a logged line, or stop the run (`rl.on_bad_reward='error'`); a step
left with no usable group is skipped and logged, and `max_skipped_steps` of
those in a row stop it. The loss of every PPO epoch and the parameters before
every checkpoint are checked: a NaN/Inf stops the run, the last good
checkpoint kept. SIGTERM saves and returns; the same call resumes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import Run
from mtp.data.tasks import Example
from mtp.errors import NonFiniteLoss, UserError
from mtp.metrics import MetricWriter, is_main_process, progress
from mtp.rl.rollouts import score_rollouts
from mtp.rl.selection import group_advantages, informative_first, step_problems, update_hard
from mtp.rl.steps import jit_rl_steps, rl_optimizer
from mtp.train.steps import all_finite
from mtp.train.supervised import kept, sigterm_flag


def load_rl_system(workdir, init_dir=None, trainable: str | None = None):
    """The system of an RL run directory (latest checkpoint) and its run; `trainable` defaults
    to the directory's name after 'rl_', `init_dir` to the sibling 'warmup'."""
    workdir = Path(workdir)
    run = ckpt.read_run(workdir)
    trainable = trainable or workdir.name.removeprefix("rl_")
    init_dir = Path(init_dir) if init_dir else workdir.parent / "warmup"
    system, _ = ckpt.load_system(init_dir)
    graphdef, state = nnx.split((system, rl_optimizer(system, run.rl, trainable)))
    mngr = ckpt.manager(workdir)
    try:
        step, state, _ = ckpt.restore_latest(mngr, ckpt.abstract(state))
    finally:
        mngr.close()
    if not step:
        raise UserError(f"{workdir}: no RL checkpoint yet; run the pipeline there first")
    return nnx.merge(graphdef, state)[0], run


def check_epochs(step: int, epochs: list[dict], mngr) -> None:
    """NonFiniteLoss naming the first PPO epoch of `step` whose loss or grad norm is NaN/Inf."""
    for i, m in enumerate(epochs):
        if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
            raise NonFiniteLoss(
                f"rl loss is {m['loss']} at step {step}, PPO epoch {i + 1} of {len(epochs)} "
                f"(grad_norm={m['grad_norm']:.4g}); stopped, {kept(mngr)}. Lower rl.lr"
            )


def _to_json(problems: list[Example]) -> list[list[str]]:
    return [[p.prompt, p.thought, p.answer] for p in problems]


def train_rl(
    run: Run,
    workdir,
    init_system,
    trainable: str,
    make_rollout: Callable,
    task,
    evaluate: Callable[[object], dict],
    name: str | None = None,
) -> dict:
    """One RL run in `workdir` from `init_system` (also the frozen KL reference); resumes.

    make_rollout(system) -> a rollout kind; evaluate(system) -> {metric: value},
    run every `rl.eval_every` steps and at the end. Returns the final evaluation.
    """
    rl_config = run.rl
    name = name or f"rl_{trainable}"
    workdir = Path(workdir)
    ckpt.check_compatible(run, workdir)
    if is_main_process():
        ckpt.write_run(run, workdir)
    ref_graphdef, ref_state = nnx.split(init_system)
    ref_state = jax.tree.map(jnp.copy, ref_state)  # the train state below is donated
    graphdef, state = nnx.split((init_system, rl_optimizer(init_system, rl_config, trainable)))
    mngr = ckpt.manager(workdir, rl_config.keep_checkpoints)
    log = lambda msg: is_main_process() and print(msg, flush=True)
    step, restored, info = ckpt.restore_latest(mngr, ckpt.abstract(state))
    if step:
        state = restored
        log(f"resuming {workdir} from step {step} of {rl_config.steps}")
    else:
        info = {"step": 0, "skipped_steps": 0, "bad_rollouts": 0}
    roll = make_rollout(nnx.merge(graphdef, state)[0])
    rl_step, ref_logprobs = jit_rl_steps(
        graphdef, ref_graphdef, rl_config, trainable, roll.token_logprob
    )
    writer = MetricWriter(workdir)
    key = jax.random.key(run.seed)
    n_prompts, g = rl_config.prompts_per_step, rl_config.group_size
    acc_m: dict[str, float] = {}
    acc_n, skipped_in_row, results = 0, 0, {}
    # train problems not yet solved by every rollout
    hard = [Example(*p) for p in info.get("hard", [])]
    credit = task.partial_score if rl_config.reward == "partial" else None  # reward, if not score
    system_now = lambda: nnx.merge(graphdef, state)[0]
    try:
        with sigterm_flag() as preempted, progress(rl_config.steps, step, name) as bar:
            t0 = time.perf_counter()
            while step < rl_config.steps:
                roll.set_weights(system_now())
                n_draw = n_prompts * rl_config.oversample
                problems = step_problems(task, step, n_draw, hard, round(rl_config.replay * n_draw))
                ro = roll(
                    [p for p in problems for _ in range(g)], group_size=g,
                    seed=jax.random.fold_in(key, step),
                )  # fmt: skip
                ro = score_rollouts(ro, task.score, rl_config.pass_price, credit)
                spread = np.nan_to_num(ro.rewards).reshape(-1, g).std(1) > 0
                stats = ro.stats() | {"groups_with_signal": float(spread.mean())}
                info["bad_rollouts"] += int(ro.bad.sum())
                if rl_config.replay:
                    hard = update_hard(
                        hard, problems, ro.scores.reshape(-1, g), rl_config.replay_size
                    )
                    info["hard"] = _to_json(hard)
                    stats["hard_problems"] = len(hard)
                if rl_config.oversample > 1:
                    ro = informative_first(ro, g, n_prompts)
                    stats["trained_groups_with_signal"] = (
                        min(int(spread.sum()), n_prompts) / n_prompts
                    )
                adv, keep = group_advantages(ro, g, rl_config, log)
                step += 1
                bar.update(1)
                if not keep.any() or ro.mask[keep].sum() == 0:
                    info["skipped_steps"] += 1
                    skipped_in_row += 1
                    log(f"rl: step {step} skipped: no usable rollout in the batch")
                    if skipped_in_row >= rl_config.max_skipped_steps:
                        raise UserError(
                            f"rl: {skipped_in_row} steps in a row had no usable rollout "
                            f"(last: {ro.errors[0] if ro.errors else 'empty batch'}); stopped"
                        )
                    continue
                skipped_in_row = 0
                batch = {k: jnp.asarray(v) for k, v in ro.batch(adv, keep).items()}
                batch["ref_lp"], teacher = ref_logprobs(ref_state, batch)
                if teacher is not None:  # rl.distill
                    batch["teacher"] = teacher
                epochs = []
                for epoch in range(rl_config.ppo_epochs):
                    state, m, lp = rl_step(state, batch, epoch == 0)
                    if epoch == 0:
                        batch["old_lp"] = lp
                    epochs.append(m)
                epochs = jax.device_get(epochs)
                check_epochs(step, epochs, mngr)
                ratios = {f"last_{n}": v for n, v in epochs[-1].items() if n.startswith("ratio")}
                m = epochs[0] | ratios | stats
                for metric, v in m.items():
                    acc_m[metric] = acc_m.get(metric, 0.0) + float(v)
                acc_n += 1
                if step % rl_config.log_every == 0 or step == rl_config.steps:
                    means = {n: v / acc_n for n, v in acc_m.items()}
                    means["s_per_step"] = (time.perf_counter() - t0) / acc_n
                    acc_m, acc_n, t0 = {}, 0, time.perf_counter()
                    writer.write(name, step, means)
                    bar.set_postfix(
                        reward=f"{means['reward']:.3f}", acc=f"{means['accuracy']:.2f}",
                        passes=f"{means['passes']:.1f}", tok_pass=f"{means['tokens_per_pass']:.2f}",
                        kl=f"{means['kl_ref']:.3f}", agree=f"{means['agree']:.2f}",
                    )  # fmt: skip
                if (
                    step % rl_config.checkpoint_every == 0
                    or step == rl_config.steps
                    or preempted["set"]
                ):
                    if not bool(all_finite(state)):
                        raise NonFiniteLoss(
                            f"rl parameters are NaN/Inf after step {step} (its losses were "
                            f"finite); stopped, {kept(mngr)}. Lower rl.lr"
                        )
                    ckpt.save(mngr, step, state, info | {"step": step}, force=preempted["set"])
                if step % rl_config.eval_every == 0 or step == rl_config.steps:
                    results = evaluate(system_now())
                    writer.write(f"{name}_eval", step, results)
                if preempted["set"]:
                    mngr.wait_until_finished()
                    log(f"SIGTERM: saved RL step {step} to {workdir}; rerun the command to resume")
                    return results
        if not results:
            results = evaluate(system_now())
        return results
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
