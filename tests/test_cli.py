"""`python -m mtp.run` as users run it: bad input, kill -9 and resume, SIGTERM, 8 devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mtp import checkpoint as ckpt
from mtp.config import resolve
from mtp.data.tokenizer import ByteTokenizer
from mtp.sharding import batch_sharding, global_batch, host_slice, make_mesh, state_shardings
from mtp.train.steps import init_train_state, jit_steps
from tests.test_train import tiny_config

BAD_UTF8 = b"abc\xff"
ROOT = Path(__file__).resolve().parent.parent
SMALL = [  # experiments/tiny.py shrunk to seconds
    "--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.n_heads=2",
    "--config.model.n_kv_heads=1", "--config.drafter.k=2", "--config.drafter.n_heads=2",
    "--config.data.seq_len=32", "--config.data.batch_size=4", "--config.data.max_bytes=60000",
    "--config.train.lr=0.01", "--config.train.warmup_steps=2", "--config.train.log_every=2",
    "--config.train.eval_batches=2",
]  # fmt: skip


def mtp_run(workdir, *args, wait=True, config="experiments/tiny.py"):
    cmd = [sys.executable, "-m", "mtp.run", f"--config={config}", f"--workdir={workdir}"]
    kw = dict(cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return subprocess.Popen(cmd + list(args), **kw)
    return subprocess.run(cmd + list(args), timeout=300, **kw)


def _files(tmp_path, name, content: bytes):
    d = tmp_path / name
    d.mkdir()
    if content is not None:
        (d / "a.txt").write_bytes(content)
    return d


@pytest.mark.parametrize(
    "case, names",
    [
        ("unknown_field", "did you mean 'd_model'"),
        ("k0", "drafter.k: must be >= 1"),
        ("tap", "model.taps: layer 9 is outside the model"),
        ("missing_corpus", "no such file or directory"),
        ("empty_corpus", "holds no files"),
        ("undecodable", "a.txt: undecodable bytes at offset 3"),
        ("seq_len", "data.seq_len: 512 is above the model's maximum (model.max_len=256)"),
        ("incompatible", "checkpoint written with model.d_model=64, this config has 32"),
        ("config_syntax", "cannot load it (SyntaxError: invalid syntax ("),
        ("config_raises", "cannot load it (RuntimeError: no such preset 'huge' ("),
        ("workdir_is_a_file", "is a file; give a run directory"),
        ("damaged_config_json", "config.json: damaged, not valid JSON"),
    ],
)
def test_bad_input_is_one_line_and_damages_nothing(tmp_path, case, names):
    workdir = tmp_path / "run"
    config = "experiments/tiny.py"
    if case.startswith("config_"):
        config = tmp_path / "config.py"
        config.write_text(
            "def get_config(:\n" if case == "config_syntax"
            else "def get_config():\n    raise RuntimeError(\"no such preset 'huge'\")\n"
        )  # fmt: skip
        names += f"{config}, line "
    if case == "workdir_is_a_file":
        workdir.write_text("notes")
    if case == "damaged_config_json":
        workdir.mkdir()
        (workdir / "config.json").write_text('{"model": {"d_model": 3')  # cut short
    args = {
        "unknown_field": ["--config.model.d_modle=3"],
        "k0": ["--config.drafter.k=0"],
        "tap": ["--config.model.taps=(9,)"],
        "missing_corpus": [f"--config.data.corpus=files:{tmp_path}/nope"],
        "empty_corpus": [f"--config.data.corpus=files:{_files(tmp_path, 'e', None)}"],
        "undecodable": [f"--config.data.corpus=files:{_files(tmp_path, 'u', BAD_UTF8)}"],
        "seq_len": ["--config.data.seq_len=512"],
        "incompatible": [],
    }.get(case, [])
    if case == "incompatible":
        ckpt.write_run(resolve(tiny_config(**{"model.d_model": 64})), workdir)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = mtp_run(workdir, *SMALL, *args, config=config)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and names in lines[-1], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_kill_9_then_the_same_command_resumes_and_matches(tmp_path):
    args = [*SMALL, "--config.train.steps=30", "--config.train.checkpoint_every=5",
            "--config.train.eval_every=30"]  # fmt: skip
    reference = mtp_run(tmp_path / "ref", *args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    proc = mtp_run(tmp_path / "run", *args, wait=False)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not (
        ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 10 for p in ckpts.iterdir())
    ):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the deadline"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert killed_at < 30
    resumed = mtp_run(tmp_path / "run", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref = json.loads((tmp_path / "ref" / "eval_report.json").read_text())
    got = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert got["step"] == ref["step"] == 30
    assert got == ref  # bit-identical: same weights, same batches after the resume
    # the resumed process started from the checkpoint, not from step 0, and said so
    assert f"{killed_at}/30" in resumed.stderr.replace(" ", "")
    assert f"resuming {tmp_path / 'run'} from step {killed_at} of 30" in resumed.stdout


def test_sigterm_saves_and_exits_0(tmp_path):
    args = [*SMALL, "--config.train.steps=100000", "--config.train.checkpoint_every=100000"]
    proc = mtp_run(tmp_path, *args, wait=False)
    csv = tmp_path / "metrics" / "train.csv"
    deadline = time.time() + 240
    while not (csv.exists() and len(csv.read_text().splitlines()) > 2):
        assert proc.poll() is None and time.time() < deadline, "training did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved step" in out
    step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert ckpt.manager(tmp_path).latest_step() == step > 0


def train_losses(strategy="replicate", devices=None, steps=3) -> list[float]:
    """Loss of `steps` train steps on fixed batches under a mesh over `devices` (all by default).

    Each process feeds its own slice of every global batch, as hosts do.
    """
    run = resolve(tiny_config(**{"data.batch_size": 8}))
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    shape = (8, 32)
    batches = [
        {"tokens": rng.integers(0, 256, shape).astype(np.int32),
         "loss_mask": np.ones(shape, np.float32)} for _ in range(steps)
    ]  # fmt: skip
    mesh = make_mesh(devices)
    graphdef, abstract_state = init_train_state(run, tok, abstract=True)
    shardings = state_shardings(abstract_state, mesh, strategy)
    state = jax.jit(lambda: init_train_state(run, tok)[1], out_shardings=shardings)()
    assert len(jax.tree.leaves(state)[0].sharding.device_set) == mesh.size
    step, _ = jit_steps(graphdef, run.train, shardings, batch_sharding(mesh))
    losses = []
    for b in batches:
        state, m = step(state, global_batch(host_slice(b), mesh))
        losses.append(float(m["loss"]))
    return losses


def _python(code: str, env: dict, wait=True):
    kw = dict(cwd=ROOT, env=dict(os.environ, **env), stdout=subprocess.PIPE, text=True)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], **kw)
    return proc.communicate(timeout=300)[0] if wait else proc


def test_eight_devices_match_one_device():
    code = """
        import json, jax
        from tests.test_cli import train_losses
        assert jax.device_count() == 8
        one = train_losses("replicate", jax.devices()[:1])
        print("RESULT", json.dumps([one, train_losses("replicate"), train_losses("fsdp")]))
    """
    out = _python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    one, replicated, fsdp = json.loads(out.split("RESULT ")[1])
    assert replicated == pytest.approx(one, rel=1e-5)
    assert fsdp == pytest.approx(one, rel=1e-5)


def test_two_hosts_with_jax_distributed_match_one_device():
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    code = """
        import json, jax
        from mtp.sharding import maybe_initialize_distributed
        maybe_initialize_distributed()
        from tests.test_cli import train_losses
        assert (jax.process_count(), jax.device_count()) == (2, 4)
        print("RESULT", json.dumps(train_losses("fsdp")))
    """
    procs = [
        _python(code, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                       "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                       "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}, wait=False)
        for i in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    one = train_losses()  # this process: one CPU device
    for out in outs:
        assert json.loads(out.split("RESULT ")[1]) == pytest.approx(one, rel=1e-5)
