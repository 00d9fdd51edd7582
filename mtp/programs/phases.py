"""Pipelines as declared phases: each phase trains in its own run directory and is skipped
once finished, so running the same command again resumes where the pipeline stopped."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from mtp import checkpoint as ckpt


def phase_done(workdir, steps: int) -> bool:
    """Has the run in `workdir` checkpointed step `steps`?"""
    if not (Path(workdir) / "checkpoints").exists():
        return False
    mngr = ckpt.manager(workdir)
    try:
        return (mngr.latest_step() or 0) >= steps
    finally:
        mngr.close()


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase: `train()` trains (or resumes) the run in `workdir` up to `steps`."""

    workdir: Path
    steps: int
    train: Callable[[], object]


def run_phases(phases: list[Phase]) -> bool | None:
    """Runs each unfinished phase in order. Returns whether any phase trained, or None if one
    stopped before its last step (SIGTERM: the pipeline resumes from it next time)."""
    ran = False
    for phase in phases:
        if phase_done(phase.workdir, phase.steps):
            continue
        ran = True
        phase.train()
        if not phase_done(phase.workdir, phase.steps):
            return None
    return ran
