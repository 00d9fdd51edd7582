"""Pause-token runs on a task: plain, pause-trained and learned-pause models, then the report.

    python -m mtp.run --config=experiments/pause.py --workdir=runs/pause

A config with a `pause` section (`mtp.config.PauseConfig`) trains, each in its
own run directory under WORKDIR (loadable with `mtp.checkpoint.load_system`):

1. `plain`: `train.steps` supervised steps on task rows without pauses;
2. `paused`: the same steps on rows with M ~ U{0..max_pauses} pauses before the
   answer, pause targets masked (`pause_data`);
3. `learned`: from `paused`, `emit_steps` steps in which the pauses are targets
   (the model learns to emit `<pause>` itself), then `rl_steps` of RL with the
   pause price scaled by urgency (`pause_rl`).

Then `mtp.evals.pause_report` decodes held-out problems and writes
WORKDIR/pause_report.{md,json}. Running the command again skips finished
phases (a phase killed midway starts over: each is a few minutes at CPU size).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import Configs, validate
from mtp.data.task_data import parse_task_spec
from mtp.metrics import MetricWriter, progress
from mtp.train.pause_data import pause_rows
from mtp.train.steps import init_train_state, jit_steps, make_optimizer

PHASES = ("plain", "paused", "learned")


def phase_done(workdir) -> bool:
    return Path(workdir, "checkpoints").exists() and ckpt.manager(workdir).latest_step() is not None


def save_system(config, workdir, system, step: int, tc) -> None:
    """Saves `system` with a fresh supervised optimizer, so `load_system` reads it back."""
    ckpt.write_config(config, workdir)
    state = nnx.state((system, nnx.Optimizer(system, make_optimizer(tc), wrt=nnx.Param)))
    mngr = ckpt.manager(workdir, 1)
    ckpt.save(mngr, step, state, {"phase_step": step})
    mngr.wait_until_finished()
    mngr.close()


def train_supervised(
    config, cs: Configs, workdir, *, max_pauses: int, emit: bool, steps: int, init_dir=None
) -> None:
    """`steps` supervised steps on pause rows (fresh weights, or those of `init_dir`)."""
    if phase_done(workdir):
        return
    pc, tc = cs.pause, dataclasses.replace(cs.train, steps=steps)
    tc = dataclasses.replace(tc, warmup_steps=min(tc.warmup_steps, steps // 10))
    task, n = parse_task_spec(pc.task)
    rows, mask = pause_rows(task, "train", n, cs.data.seq_len, max_pauses=max_pauses,
                            seed=cs.seed, emit=emit)  # fmt: skip
    if init_dir is None:
        graphdef, state = init_train_state(cs)
    else:
        system, _ = ckpt.load_system(init_dir)
        graphdef, state = nnx.split(
            (system, nnx.Optimizer(system, make_optimizer(tc), wrt=nnx.Param))
        )
    train_step, _ = jit_steps(graphdef, tc)
    rng = np.random.default_rng(cs.seed + 1)
    writer = MetricWriter(workdir, tensorboard=False)
    b = cs.data.batch_size
    with progress(steps, desc=Path(workdir).name) as bar:
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            idx = rng.integers(0, n, b)
            state, metrics = train_step(state, {"tokens": rows[idx], "loss_mask": mask[idx]})
            bar.update(1)
            if step % tc.log_every == 0 or step == steps:
                m = jax.device_get(metrics)
                m["s_per_step"] = (time.perf_counter() - t0) / step
                writer.write("train", step, m)
                bar.set_postfix(loss=f"{m['loss/main']:.3f}", acc=f"{m['acc/main']:.3f}")
    writer.close()
    system, _ = nnx.merge(graphdef, state)
    save_system(config, workdir, system, steps, tc)


def run_pipeline(config, workdir) -> dict:
    """All phases (skipping finished ones), then the report; returns its rows."""
    from mtp.evals.pause_report import write_report
    from mtp.train.pause_rl import train_pause_rl

    cs = validate(config)
    pc, workdir = cs.pause, Path(workdir)
    ckpt.write_config(config, workdir)
    steps = cs.train.steps
    train_supervised(config, cs, workdir / "plain", max_pauses=0, emit=False, steps=steps)
    train_supervised(config, cs, workdir / "paused", max_pauses=pc.max_pauses, emit=False,
                     steps=steps)  # fmt: skip
    emit_dir = workdir / "learned_emit"
    train_supervised(config, cs, emit_dir, max_pauses=pc.max_pauses, emit=True,
                     steps=max(pc.emit_steps, 1), init_dir=workdir / "paused")  # fmt: skip
    train_pause_rl(config, cs, workdir / "learned", init_dir=emit_dir)
    return write_report(config, workdir)
