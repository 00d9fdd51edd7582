"""`run_sweep(config, workdir)`: one supervised run per (drafter kind, k), resumable.

    WORKDIR/sweep.json         the members (of every launch so far) and the latest config
    WORKDIR/k{K}_{KIND}/       one run directory per member (`train_and_evaluate`)
      eval_report.json         written when the member's training has finished
      speedup.json             slow vs speculative decoding of held-out prompts
    WORKDIR/sweep_summary.{csv,md}, WORKDIR/plots/*.png   (`mtp.programs.sweep.summary`)

A member whose eval_report.json is at the config's last step is finished and
skipped; any other resumes from its last checkpoint. `sweep.only` runs one
member, so members can be spread over hosts that share WORKDIR (or copy their
member directories back into one); `collect(workdir)` then writes the summary
from whatever has finished.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mtp.checkpoint import load_system
from mtp.config import Run, SweepConfig
from mtp.data.tokenizer import Tokenizer
from mtp.files import atomic_write_text
from mtp.metrics import is_main_process
from mtp.programs.sweep.speedup import held_out_prompts, measure_speedup
from mtp.programs.sweep.summary import collect
from mtp.train.supervised import train_and_evaluate

MANIFEST = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Member:
    kind: str
    k: int

    @property
    def name(self) -> str:
        return f"k{self.k}_{self.kind}"


def members(sweep_config: SweepConfig) -> list[Member]:
    """Every member in sweep order (as `SweepConfig.member_names`)."""
    return [Member(kind, k) for kind in sweep_config.kinds for k in sweep_config.ks]


def selected(sweep_config: SweepConfig) -> list[Member]:
    """The members this launch runs: all, or the one named (or indexed) by `sweep.only`."""
    ms = members(sweep_config)
    if not sweep_config.only:
        return ms
    if sweep_config.only.isdigit():
        return [ms[int(sweep_config.only)]]
    return [m for m in ms if m.name == sweep_config.only]


def member_run(run: Run, m: Member) -> Run:
    """The run of one member: program 'train', no sweep, drafter.k and drafter.kind set."""
    drafter = dataclasses.replace(run.drafter, k=m.k, kind=m.kind)
    return run.replace(program="train", sweep=None, drafter=drafter)


def is_finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "eval_report.json"
    return path.exists() and json.loads(path.read_text()).get("step", -1) >= steps


def write_manifest(run: Run, workdir: Path, sweep_config: SweepConfig) -> None:
    """WORKDIR/sweep.json: the members of every launch so far (a sweep can grow) and the config."""
    path = workdir / MANIFEST
    old = json.loads(path.read_text())["members"] if path.exists() else []
    new = [dataclasses.asdict(m) | {"name": m.name} for m in members(sweep_config)]
    names = {m["name"] for m in old}
    manifest = {
        "members": old + [m for m in new if m["name"] not in names],
        "config": run.to_dict(),
    }
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True))


def measure(
    member: Run, run_dir: Path, sweep_config: SweepConfig, tok: Tokenizer, log=print
) -> dict | None:
    """Decodes held-out prompts slow vs speculative; writes RUN_DIR/speedup.json."""
    prompts = held_out_prompts(member, tok, sweep_config.speedup_prompts, sweep_config.prompt_len)
    if not prompts:
        log(
            f"sweep: {run_dir.name}: no held-out row has {sweep_config.prompt_len} tokens; "
            "no speedup"
        )
        return None
    system, _ = load_system(run_dir)
    result = measure_speedup(system, tok, prompts, sweep_config)
    if is_main_process():
        (run_dir / "speedup.json").write_text(json.dumps(result, indent=2))
    log(
        f"sweep: {run_dir.name}: speculative {result['speedup']:.2f}x slow, "
        f"{result['spec_mean_accepted']:.2f} drafts accepted per pass"
    )
    return result


def run_member(run: Run, workdir: Path, m: Member, tok: Tokenizer, log=print) -> bool:
    """Trains (or resumes, or skips) one member, then measures its speedup once.

    Returns False if training stopped before its last step (SIGTERM): resume later.
    """
    sweep_config, member = run.sweep, member_run(run, m)
    run_dir, steps = workdir / m.name, member.train.steps
    if is_finished(run_dir, steps):
        log(f"sweep: {m.name}: finished, skipped")
    else:
        train_and_evaluate(member, run_dir, tok)
        if not is_finished(run_dir, steps):
            return False
    if sweep_config.speedup_prompts and not (run_dir / "speedup.json").exists():
        measure(member, run_dir, sweep_config, tok, log)
    return True


def run_sweep(run: Run, workdir, tok: Tokenizer, log=print) -> str:
    """Runs the selected members in sequence, then writes and returns the summary table."""
    sweep_config, workdir = run.sweep, Path(workdir)
    for m in members(sweep_config):  # every member's run must be valid before the first one trains
        member_run(run, m)
    if is_main_process():
        write_manifest(run, workdir, sweep_config)
    todo = selected(sweep_config)
    for i, m in enumerate(todo):
        log(f"sweep: {m.name} ({i + 1}/{len(todo)}) in {workdir / m.name}")
        if not run_member(run, workdir, m, tok, log):
            log(f"sweep: stopped during {m.name}; run the same command to resume")
            break
    return collect(workdir)
