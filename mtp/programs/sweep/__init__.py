"""Sweeps over drafter k and kind: `run_sweep` trains the members, `collect` summarises them."""

from mtp.programs.sweep.runner import members, run_sweep
from mtp.programs.sweep.summary import collect, load_rows

__all__ = ["collect", "load_rows", "members", "run_sweep"]
