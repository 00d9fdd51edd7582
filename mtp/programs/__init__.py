"""What `python -m mtp.run` runs: one function per program, by the config's `program`.

    run_program(resolve(config), workdir)

`train`: the supervised loop; `rl`: warm-up then RL arms; `pause`: the pause
phases and their report; `sweep`: one training run per drafter kind and k.
"""

from __future__ import annotations

from mtp.config import Run
from mtp.data.task_data import check_tasks
from mtp.data.tokenizer import tokenizer_of
from mtp.programs.pause import run_pause
from mtp.programs.rl import run_rl
from mtp.programs.sweep import run_sweep
from mtp.train.pretrained import with_checkpoint_shapes
from mtp.train.supervised import train_and_evaluate

PROGRAMS = {
    "train": train_and_evaluate,
    "rl": run_rl,
    "pause": run_pause,
    "sweep": run_sweep,
}


def run_program(run: Run, workdir):
    """Checks what needs the run's tasks, then runs its program in `workdir`, with the main
    model's shapes from its pretrained checkpoint if `model.init_from` names one."""
    check_tasks(run)
    tok = tokenizer_of(run)
    return PROGRAMS[run.program](with_checkpoint_shapes(run, tok), workdir, tok)
