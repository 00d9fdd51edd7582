"""Sweeps over k (`mtp.programs.sweep`): a run per member, finished ones skipped, summary, plots."""

import csv
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtp.config import ConfigError, resolve
from mtp.data.tokenizer import ByteTokenizer
from mtp.programs.sweep import collect, run_sweep, runner
from mtp.programs.sweep.runner import is_finished, member_run, members, selected, write_manifest
from mtp.programs.sweep.summary import PLOTS

ROOT = Path(__file__).resolve().parent.parent
TOK = ByteTokenizer()


def sweep_k(arg=None):
    path = ROOT / "experiments" / "sweep_k.py"
    spec = importlib.util.spec_from_file_location("sweep_k", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny_sweep(**sweep):
    """experiments/sweep_k.py:tiny with transformer drafters at k = 1, 2 (two runs), resolved."""
    c = sweep_k("tiny")
    c.sweep.update(dict(ks=(1, 2), kinds=("transformer",)) | sweep)
    return resolve(c)


def _train_rows(run_dir: Path) -> list[str]:
    return (run_dir / "metrics" / "train.csv").read_text().splitlines()


def test_sweep_runs_each_member_then_skips_finished_ones(tmp_path):
    # one member alone (as on its own host): only its directory is trained
    run_sweep(tiny_sweep(only="k2_transformer"), tmp_path, TOK)
    assert not (tmp_path / "k1_transformer").exists()
    k2_rows = _train_rows(tmp_path / "k2_transformer")
    assert "1/2 runs finished" in (tmp_path / "sweep_summary.md").read_text()

    # the whole sweep: trains k1 only, k2 is finished
    text = run_sweep(tiny_sweep(), tmp_path, TOK)
    assert "2/2 runs finished" in text
    assert _train_rows(tmp_path / "k2_transformer") == k2_rows
    with (tmp_path / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["k1_transformer", "k2_transformer"]
    assert [int(r["k"]) for r in rows] == [1, 2]
    assert rows[0]["acc_draft_2"] == "" and 0 < float(rows[1]["acc_draft_2"]) <= 1
    for r in rows:
        assert float(r["train_tokens_per_s"]) > 0 and float(r["speedup"]) > 0
        assert r["identical"] == "True"  # speculative greedy = slow greedy
        assert 0 <= float(r["spec_mean_accepted"]) <= int(r["k"])
    for name in PLOTS:
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000
    assert "| k1_transformer | 1 | transformer |" in (tmp_path / "sweep_summary.md").read_text()

    # the same command again, from the command line: no training, done at once
    names = ("k1_transformer", "k2_transformer")
    reports = {m: (tmp_path / m / "eval_report.json").stat().st_mtime_ns for m in names}
    rows_before = {m: _train_rows(tmp_path / m) for m in reports}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "mtp.run", "--config=experiments/sweep_k.py:tiny",
         f"--workdir={tmp_path}", "--config.sweep.kinds=('transformer',)",
         "--config.sweep.ks=(1, 2)"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("finished, skipped") == 2 and "2/2 runs finished" in out.stdout
    assert {m: _train_rows(tmp_path / m) for m in reports} == rows_before
    assert {m: (tmp_path / m / "eval_report.json").stat().st_mtime_ns for m in reports} == reports
    assert elapsed < 60, f"a finished sweep took {elapsed:.0f}s to re-run"

    # collecting (e.g. after copying member directories back from their hosts)
    out = subprocess.run(
        [sys.executable, "-m", "mtp.run", f"--workdir={tmp_path}", "--mode=report"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0 and "| k2_transformer | 2 |" in out.stdout

    # a launch with other members adds them to the sweep; the finished ones stay in its table
    text = run_sweep(tiny_sweep(kinds=("medusa",), ks=(1,), speedup_prompts=0), tmp_path, TOK)
    assert "3/3 runs finished" in text and "| k2_transformer | 2 |" in text


def test_unfinished_members_appear_as_empty_rows(tmp_path):
    run = tiny_sweep()
    write_manifest(run, tmp_path, run.sweep)
    member = tmp_path / "k2_transformer"
    member.mkdir()
    (member / "eval_report.json").write_text(json.dumps({"step": 3, "acc_draft_1": 0.5}))
    text = collect(tmp_path)
    assert "1/2 runs finished" in text and "| k1_transformer | 1 | transformer | - |" in text
    assert not is_finished(member, steps=6) and is_finished(member, steps=3)  # step 3 of 6 resumes
    assert all((tmp_path / "plots" / f"{p}.png").exists() for p in PLOTS)


def test_member_run_sets_k_and_kind_and_drops_the_sweep():
    c = sweep_k("tiny")
    run = resolve(c)
    ms = members(run.sweep)
    assert [m.name for m in ms] == ["k1_transformer", "k2_transformer", "k1_medusa", "k2_medusa"]
    mr = member_run(run, ms[3])
    assert mr.program == "train" and mr.sweep is None and "sweep" not in mr.to_dict()
    assert mr.drafter.k == 2 and mr.drafter.kind == "medusa"
    assert run.drafter.k == 4 and run.sweep is not None  # the sweep's own run is untouched
    c.sweep.only = "2"
    assert [m.name for m in selected(resolve(c).sweep)] == ["k1_medusa"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("kinds", ("lstm",), "sweep.kinds: 'lstm' not in"),
        ("ks", (1, 0), "sweep.ks: every k must be >= 1, got 0"),
        ("ks", (2, 2), "sweep.ks: has duplicates"),
        ("only", "k3_transformer", "sweep.only: 'k3_transformer' is not a member; allowed: ''"),
        ("only", "9", "sweep.only: '9' is not a member"),
        ("prompt_len", 33, "sweep.prompt_len: 33 is above data.seq_len=32"),
        ("new_tokens", 60, "sweep.new_tokens: prompt_len \\+ new_tokens = 76 is above"),
        ("speedup_prompts", -1, "sweep.speedup_prompts: must be >= 0"),
    ],
)
def test_bad_sweep_values_name_the_field(field, value, message):
    c = sweep_k("tiny")
    c.sweep[field] = value
    with pytest.raises(ConfigError, match=message):
        resolve(c)


@pytest.mark.parametrize("arg", [None, "tiny", "cpu", "gpu"])
def test_every_sweep_k_size_and_member_validates(arg):
    run = resolve(sweep_k(arg))
    for m in members(run.sweep):
        member = member_run(run, m)  # re-checked as a run of its own
        assert resolve(member.to_dict()) == member


def test_a_preempted_member_stops_the_sweep(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(  # as after SIGTERM: returns before the last step, no eval_report
        runner, "train_and_evaluate", lambda run, workdir, tok: calls.append(workdir)
    )
    text = run_sweep(tiny_sweep(), tmp_path, TOK, log=lambda line: None)
    assert calls == [tmp_path / "k1_transformer"]  # k2 not started, nothing measured
    assert "0/2 runs finished" in text and not (tmp_path / "k1_transformer").exists()
