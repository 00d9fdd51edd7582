"""Program 'rl': supervised warm-up, then RL, every phase resumable.

    WORKDIR/warmup/         the supervised run (`train_and_evaluate`, data.corpus 'task:...')
    WORKDIR/rl_<trainable>/ one RL run per entry of rl.trainable, each started from
                            the warm-up's last checkpoint; its frozen copy is the
                            KL reference
    WORKDIR/rl_summary.md   greedy held-out accuracy and passes of every phase

The RL loop is `mtp.rl.learner.train_rl` with think rollouts.
"""

from __future__ import annotations

import json
from pathlib import Path

from mtp import checkpoint as ckpt
from mtp.config import Run
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import Tokenizer
from mtp.evals.task_accuracy import TaskAccuracy
from mtp.metrics import format_table, is_main_process
from mtp.programs.phases import Phase, run_phases
from mtp.rl.learner import load_rl_system, train_rl
from mtp.rl.rollouts import ThinkRollout, thought_mode_of
from mtp.train.supervised import train_and_evaluate


def evaluator(run: Run, tok: Tokenizer, thought_mode: str | None = None):
    """The greedy held-out evaluation of an RL run: system -> {metric: value}."""
    rl_config = run.rl
    task, _ = parse_task_spec(rl_config.task)
    ev = TaskAccuracy(
        task, tok, rl_config.eval_prompts,
        thought_mode=thought_mode_of(thought_mode or rl_config.thought_mode, sample=False),
        think_budget=rl_config.think_budget, answer_max_tokens=rl_config.answer_max_tokens,
        batch_size=rl_config.prompts_per_step * rl_config.group_size,
    )  # fmt: skip
    return lambda system: dict(ev.run(system))


def rl_policy(init_dir, run: Run):
    """The warm-up's system as RL starts it: taps detached or not by `rl.detach`, not the warm-up's
    `drafter.detach`, so joint RL can teach a main model the drafter never trained to talk."""
    system, _ = ckpt.load_system(init_dir)
    system.set_detach(run.rl.detach)
    return system


def train_arm(run: Run, workdir, init_dir, trainable: str, tok: Tokenizer) -> dict:
    """One RL arm: think rollouts from the warm-up in `init_dir`."""
    task, _ = parse_task_spec(run.rl.task)
    return train_rl(
        run, workdir, rl_policy(init_dir, run), trainable,
        make_rollout=lambda system: ThinkRollout(system, tok, run.rl),
        task=task, evaluate=evaluator(run, tok),
    )  # fmt: skip


def run_rl(run: Run, workdir, tok: Tokenizer) -> dict:
    """Warm-up, then one RL run per rl.trainable; returns {phase: greedy eval}."""
    workdir = Path(workdir)
    ckpt.check_compatible(run, workdir)
    if is_main_process():
        ckpt.write_run(run, workdir)
    warm = workdir / "warmup"
    phases = [Phase(warm, run.train.steps, lambda: train_and_evaluate(run, warm, tok))]
    for trainable in run.rl.trainable:
        arm = workdir / f"rl_{trainable}"
        phases.append(
            Phase(arm, run.rl.steps, lambda a=arm, t=trainable: train_arm(run, a, warm, t, tok))
        )
    ran = run_phases(phases)
    if ran is None:  # stopped by SIGTERM: resume later
        return {}
    saved = workdir / "rl_summary.json"
    if saved.exists() and not ran:  # everything finished before: show the saved summary
        print((workdir / "rl_summary.md").read_text())
        return json.loads(saved.read_text())
    return summarize(run, workdir, tok)


def summarize(run: Run, workdir, tok: Tokenizer) -> dict:
    """Greedy held-out accuracy and passes of the warm-up (slow and fast) and every RL run."""
    rl_config = run.rl
    workdir = Path(workdir)
    warm_system, _ = ckpt.load_system(workdir / "warmup")
    rows, out = [], {}
    for mode in ("slow", "fast"):
        out[f"warmup_{mode}"] = evaluator(run, tok, mode)(warm_system)
    for trainable in rl_config.trainable:
        system, _ = load_rl_system(workdir / f"rl_{trainable}", workdir / "warmup")
        out[f"rl_{trainable}"] = evaluator(run, tok)(system)
    for name, r in out.items():
        rows.append([name, r["accuracy"], r["passes"], r["thought_passes"], r["tokens_per_pass"]])
    table = format_table(rows, ["system", "accuracy", "passes", "thought passes", "tokens/pass"])
    text = (
        f"## RL summary: {rl_config.task}, {rl_config.eval_prompts} held-out problems, greedy, "
        f"think budget {rl_config.think_budget or 'none'}\n\n{table}\n"
    )
    if is_main_process():
        print(text)
        (workdir / "rl_summary.md").write_text(text)
        (workdir / "rl_summary.json").write_text(json.dumps(out, indent=2))
    return out
