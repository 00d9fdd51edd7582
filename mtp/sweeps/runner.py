"""`run_sweep(config, workdir)`: one supervised run per (drafter kind, k), resumable.

    WORKDIR/sweep.json         the members (of every launch so far) and the latest config
    WORKDIR/k{K}_{KIND}/       one run directory per member (`train_and_evaluate`)
      eval_report.json         written when the member's training has finished
      speedup.json             slow vs speculative decoding of held-out prompts
    WORKDIR/sweep_summary.{csv,md}, WORKDIR/plots/*.png   (`mtp.sweeps.summary`)

A member whose eval_report.json is at the config's last step is finished and
skipped; any other resumes from its last checkpoint. `sweep.only` runs one
member, so members can be spread over hosts that share WORKDIR (or copy their
member directories back into one); `collect(workdir)` then writes the summary
from whatever has finished.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import ml_collections

from mtp.config import SweepConfig, UserError, validate
from mtp.metrics import is_main_process
from mtp.sweeps.summary import collect

MANIFEST = "sweep.json"


@dataclasses.dataclass(frozen=True)
class Member:
    kind: str
    k: int

    @property
    def name(self) -> str:
        return f"k{self.k}_{self.kind}"


def members(sc: SweepConfig) -> list[Member]:
    """Every member in sweep order (as `SweepConfig.member_names`)."""
    return [Member(kind, k) for kind in sc.kinds for k in sc.ks]


def selected(sc: SweepConfig) -> list[Member]:
    """The members this launch runs: all, or the one named (or indexed) by `sweep.only`."""
    ms = members(sc)
    if not sc.only:
        return ms
    if sc.only.isdigit():
        return [ms[int(sc.only)]]
    return [m for m in ms if m.name == sc.only]


def member_config(config, m: Member) -> ml_collections.ConfigDict:
    """The config of one member: everything but `sweep`, with drafter.k and drafter.kind set."""
    d = config.to_dict()
    d.pop("sweep", None)
    c = ml_collections.ConfigDict(d)
    c.drafter.k = m.k
    c.drafter.kind = m.kind
    return c


def is_finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "eval_report.json"
    return path.exists() and json.loads(path.read_text()).get("step", -1) >= steps


def write_manifest(config, workdir: Path, sc: SweepConfig) -> None:
    """WORKDIR/sweep.json: the members of every launch so far (a sweep can grow) and the config."""
    path = workdir / MANIFEST
    old = json.loads(path.read_text())["members"] if path.exists() else []
    new = [dataclasses.asdict(m) | {"name": m.name} for m in members(sc)]
    names = {m["name"] for m in old}
    manifest = {
        "members": old + [m for m in new if m["name"] not in names],
        "config": json.loads(config.to_json_best_effort()),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f"{MANIFEST}.tmp{time.time_ns()}"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    tmp.rename(workdir / MANIFEST)  # atomic, so hosts launched together do not clash


def measure(member_cfg, run_dir: Path, sc: SweepConfig, log=print) -> dict | None:
    """Decodes held-out prompts slow vs speculative; writes RUN_DIR/speedup.json."""
    from mtp.checkpoint import load_system
    from mtp.sweeps.speedup import held_out_prompts, measure_speedup

    prompts = held_out_prompts(member_cfg, sc.speedup_prompts, sc.prompt_len)
    if not prompts:
        log(f"sweep: {run_dir.name}: no held-out row has {sc.prompt_len} tokens; no speedup")
        return None
    system, _ = load_system(run_dir)
    result = measure_speedup(system, prompts, sc)
    if is_main_process():
        (run_dir / "speedup.json").write_text(json.dumps(result, indent=2))
    log(
        f"sweep: {run_dir.name}: speculative {result['speedup']:.2f}x slow, "
        f"{result['spec_mean_accepted']:.2f} drafts accepted per pass"
    )
    return result


def run_member(config, workdir: Path, m: Member, sc: SweepConfig, log=print) -> bool:
    """Trains (or resumes, or skips) one member, then measures its speedup once.

    Returns False if training stopped before its last step (SIGTERM): resume later.
    """
    from mtp.train.loop import train_and_evaluate

    mc = member_config(config, m)
    run_dir, steps = workdir / m.name, validate(mc).train.steps
    if is_finished(run_dir, steps):
        log(f"sweep: {m.name}: finished, skipped")
    else:
        train_and_evaluate(mc, run_dir)
        if not is_finished(run_dir, steps):
            return False
    if sc.speedup_prompts and not (run_dir / "speedup.json").exists():
        measure(mc, run_dir, sc, log)
    return True


def run_sweep(config, workdir, log=print) -> str:
    """Runs the selected members in sequence, then writes and returns the summary table."""
    cs = validate(config)
    if cs.sweep is None:
        raise UserError("the config has no sweep section (e.g. experiments/sweep_k.py)")
    sc, workdir = cs.sweep, Path(workdir)
    for m in members(sc):  # every member's config must be valid before the first one trains
        validate(member_config(config, m))
    if is_main_process():
        write_manifest(config, workdir, sc)
    todo = selected(sc)
    for i, m in enumerate(todo):
        log(f"sweep: {m.name} ({i + 1}/{len(todo)}) in {workdir / m.name}")
        if not run_member(config, workdir, m, sc, log):
            log(f"sweep: stopped during {m.name}; run the same command to resume")
            break
    return collect(workdir)
