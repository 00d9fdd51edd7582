"""Program 'pause': plain, pause-trained and learned-pause models, then the report.

    python -m mtp.run --config=experiments/pause.py --workdir=runs/pause

Each phase is its own run directory under WORKDIR (loadable with
`mtp.checkpoint.load_system`), trained by the one supervised loop or the one
RL learner, so each resumes, evaluates and shards like any run:

1. `plain`: `train.steps` supervised steps on task rows without pauses;
2. `paused`: the same steps on rows with M ~ U{0..max_pauses} pauses before the
   answer, pause targets masked;
3. `learned_emit`: from `paused`, `pause.emit_steps` steps in which the pauses
   are targets (the model learns to emit `<pause>` itself);
4. `learned`: from `learned_emit`, the `rl` section's steps of RL with the
   `pause` rollout (`mtp.rl.rollouts.PauseRollout`).

Rows mask the prompt's own targets (its letters are random). Then
`mtp.evals.pause_report` decodes held-out problems and writes
WORKDIR/pause_report.{md,json}. Running the command again skips finished phases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mtp import checkpoint as ckpt
from mtp.config import Run
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import Tokenizer
from mtp.decode.modes import Pause
from mtp.evals.pause_report import PauseAccuracy, write_report
from mtp.programs.phases import Phase, run_phases
from mtp.rl.learner import train_rl
from mtp.rl.rollouts import PauseRollout
from mtp.train.supervised import train_and_evaluate


def phase_run(run: Run, *, pauses: int, targets: bool, steps: int) -> Run:
    """The supervised run of a phase: pause rows of `pause.task`, `steps` steps."""
    data = dataclasses.replace(
        run.data, corpus=f"task:{run.pause.task}", pauses=pauses, pause_targets=targets,
        prompt_targets=False,
    )  # fmt: skip
    train = dataclasses.replace(
        run.train, steps=steps, warmup_steps=min(run.train.warmup_steps, steps // 10)
    )
    return run.replace(program="train", rl=None, pause=None, data=data, train=train)


def learned_evaluator(run: Run, tok: Tokenizer):
    """Accuracy and pauses of the learned policy at urgency 0 and 1: system -> metrics."""
    task, _ = parse_task_spec(run.pause.task)
    ev = PauseAccuracy(task, tok, min(run.rl.eval_prompts, run.pause.eval_prompts))
    policy = Pause("learned", cap=run.pause.cap)

    def evaluate(system) -> dict:
        out = {}
        for u in (0, 1):
            r = dict(ev.run(system, policy, float(u)))
            out |= {f"accuracy_u{u}": r["accuracy"], f"pauses_u{u}": r["pauses"]}
        return out

    return evaluate


def run_pause(run: Run, workdir, tok: Tokenizer) -> dict:
    """All phases (skipping finished ones), then the report; returns its rows."""
    pause, workdir = run.pause, Path(workdir)
    ckpt.check_compatible(run, workdir)
    ckpt.write_run(run, workdir)
    task, _ = parse_task_spec(pause.task)
    steps, emit_steps = run.train.steps, max(pause.emit_steps, 1)
    plain = phase_run(run, pauses=0, targets=False, steps=steps)
    paused = phase_run(run, pauses=pause.max_pauses, targets=False, steps=steps)
    emit = phase_run(run, pauses=pause.max_pauses, targets=True, steps=emit_steps)
    dirs = {name: workdir / name for name in ("plain", "paused", "learned_emit", "learned")}

    def learn():
        system, _ = ckpt.load_system(dirs["learned_emit"])
        return train_rl(
            run, dirs["learned"], system, "both",
            make_rollout=lambda s: PauseRollout(
                s, tok, run.rl, cap=pause.cap, max_answer=task.max_answer_len + 1
            ),
            task=task, evaluate=learned_evaluator(run, tok), name="learned",
        )  # fmt: skip

    ran = run_phases([
        Phase(dirs["plain"], steps, lambda: train_and_evaluate(plain, dirs["plain"], tok)),
        Phase(dirs["paused"], steps, lambda: train_and_evaluate(paused, dirs["paused"], tok)),
        Phase(dirs["learned_emit"], emit_steps, lambda: train_and_evaluate(
            emit, dirs["learned_emit"], tok, init_from=dirs["paused"])),
        Phase(dirs["learned"], run.rl.steps, learn),
    ])  # fmt: skip
    if ran is None:
        return {}
    return write_report(run, workdir, tok)
