"""Runs that go wrong: NaN/Inf on any update, a damaged newest checkpoint, resume lines."""

import dataclasses
import itertools
import json
import shutil

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import RLConfig, resolve
from mtp.data.tokenizer import ByteTokenizer
from mtp.errors import DamagedCheckpoint, NonFiniteLoss, UserError
from mtp.metrics import read_csv
from mtp.programs import rl as rl_program
from mtp.rl import learner
from mtp.train import supervised
from mtp.train.steps import init_train_state
from tests.test_train import tiny_config

TOK = ByteTokenizer()


def _poison(tree):
    """`tree` with every float array NaN."""
    nan = lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.inexact) else x
    return jax.tree.map(nan, tree)


def _finite(tree) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(jnp.isfinite(x).all()) for x in leaves)


def rl_config():
    """tiny_config as program 'rl': a 4-step warm-up on 2-digit addition, then RL steps of two
    groups of two think rollouts, a checkpoint every step, two PPO epochs each."""
    c = tiny_config(**{"data.corpus": "task:addition:digits=2,n=200", "train.steps": 4,
                       "train.warmup_steps": 1, "train.log_every": 2, "train.eval_every": 4,
                       "train.eval_batches": 1, "train.checkpoint_every": 4})  # fmt: skip
    c.program = "rl"
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(task="addition:digits=2", trainable=("both",), steps=1, prompts_per_step=2,
                group_size=2, think_budget=3, answer_max_tokens=4, ppo_epochs=2, log_every=1,
                eval_every=100, eval_prompts=4, checkpoint_every=1)  # fmt: skip
    return c


def _restored(workdir, config, step):
    _, abstract_state = init_train_state(resolve(config), TOK, abstract=True)
    mngr = ckpt.manager(workdir)
    state, _ = ckpt.restore(mngr, step, abstract_state)
    mngr.close()
    return state


@pytest.mark.parametrize(
    "what, message, logged",
    [
        ("loss", r"loss is nan at step 5 .*checkpoint step 3 kept", [2, 4]),
        ("params", r"parameters are NaN/Inf after the update of step 6 .*step 3 kept", [2, 4, 6]),
    ],
)
def test_a_nonfinite_update_between_checks_stops_the_run_before_it_is_saved(
    tmp_path, monkeypatch, what, message, logged
):
    """Logged every 2 steps, saved every 3: the loss is NaN from step 5 on (a step that neither
    logs nor saves), or the update of step 6 (its loss finite) leaves NaN parameters. Either
    stops the run at the next check, naming the first bad step: nothing after step 3 is
    saved, and the NaN loss stops the run at the log of step 6, before its row is written."""
    make_steps = supervised.jit_steps

    def diverging_steps(*args, **kwargs):
        train_step, eval_step = make_steps(*args, **kwargs)
        calls = itertools.count(1)

        def step(state, batch):
            state, metrics = train_step(state, batch)
            n = next(calls)
            if what == "loss" and n >= 5:
                metrics = metrics | {"loss": metrics["loss"] * jnp.nan}
            if what == "params" and n == 6:
                state = _poison(state)
            return state, metrics

        return step, eval_step

    monkeypatch.setattr(supervised, "jit_steps", diverging_steps)
    c = tiny_config(**{"train.log_every": 2, "train.checkpoint_every": 3, "train.eval_every": 9,
                       "train.steps": 9})  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=message) as e:
        supervised.train_and_evaluate(resolve(c), tmp_path, TOK)
    assert "\n" not in str(e.value)
    assert [r["step"] for r in read_csv(tmp_path, "train")] == logged
    mngr = ckpt.manager(tmp_path)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [3]
    assert _finite(_restored(tmp_path, c, 3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 6-step run with checkpoints at steps 3 and 6, and its config."""
    workdir = tmp_path_factory.mktemp("trained")
    c = tiny_config(**{"train.steps": 6, "train.checkpoint_every": 3, "train.eval_every": 6})
    supervised.train_and_evaluate(resolve(c), workdir, TOK)
    return workdir, c


def _damage(workdir, how: str):
    """Damages the largest array file of the newest step (6) as `how`; returns its path."""
    files = (workdir / "checkpoints" / "6" / "state").rglob("d/*")
    path = max(files, key=lambda p: p.stat().st_size)
    if how == "truncated":  # a copy cut short (disk full, interrupted rsync)
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    elif how == "deleted":
        path.unlink()
    else:  # garbled: the size is right, every byte wrong
        path.write_bytes(b"\xff" * path.stat().st_size)
    return path


@pytest.mark.parametrize("how", ["truncated", "deleted", "garbled"])
def test_decode_names_the_damaged_file_and_the_step_to_fall_back_to(tmp_path, trained, how):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    path = _damage(workdir, how)
    with pytest.raises(DamagedCheckpoint) as e:
        ckpt.load_system(workdir)
    text = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in text
    assert text.startswith(f"checkpoint step 6 is damaged: {path}: ")
    assert {"truncated": "truncated", "deleted": "missing", "garbled": "unreadable"}[how] in text
    assert text.endswith(f"delete {workdir / 'checkpoints' / '6'} to load step 3")
    assert _finite(ckpt.load_system(workdir, step=3)[0])  # the older step is untouched


def test_a_run_directory_named_through_dot_dot_loads(tmp_path, trained):
    """A relative path with '..' (a benchmark run from benchmarks/) names the run as well."""
    shutil.copytree(trained[0], tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    system, _ = ckpt.load_system(tmp_path / "elsewhere" / ".." / "run")
    assert _finite(system)


def test_a_run_directory_from_before_a_field_existed_still_resumes(tmp_path):
    """A config.json without a field added since (here `drafter.init_from`) reads as that
    field's default: its run resumes; a changed shape field is still refused."""
    run = resolve(tiny_config())
    ckpt.write_run(run, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["drafter"]["init_from"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    ckpt.check_compatible(run, tmp_path)
    with pytest.raises(UserError, match=r"drafter.k=2, this config has 3"):
        ckpt.check_compatible(resolve(tiny_config(**{"drafter.k": 3})), tmp_path)


def test_training_resumes_from_the_newest_intact_step(tmp_path, trained, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    intact = json.loads((workdir / "eval_report.json").read_text())
    path = _damage(workdir, "truncated")
    capsys.readouterr()
    results = supervised.train_and_evaluate(resolve(trained[1]), workdir, TOK)
    out = capsys.readouterr()
    warning = [line for line in out.err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and f"checkpoint step 6 is damaged: {path}: truncated" in warning[0]
    assert f"moved it to {workdir / 'checkpoints_damaged' / '6'}" in warning[0]
    assert f"resuming {workdir} from step 3 of 6" in out.out
    assert (workdir / "checkpoints_damaged" / "6" / "state").is_dir()  # kept for a look
    assert ckpt.manager(workdir).all_steps() == [3, 6]  # step 6 saved again, whole
    assert ckpt.damage(workdir / "checkpoints" / "6") is None
    assert results["main_loss"] == pytest.approx(intact["main_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    """A warm-up and one RL step of it (checkpointed), the RL config asking for 3 steps."""
    root = tmp_path_factory.mktemp("rl")
    c = rl_config()
    run = resolve(c)
    supervised.train_and_evaluate(run, root / "warmup", TOK)
    rl_program.train_arm(run, root / "rl_both", root / "warmup", "both", TOK)
    c.rl.steps = 3
    return root, resolve(c)


@pytest.mark.parametrize(
    "what, message",
    [
        ("loss", r"rl loss is nan at step 2, PPO epoch 2 of 2 .*checkpoint step 1 kept"),
        ("params", r"rl parameters are NaN/Inf after step 2 .*checkpoint step 1 kept"),
    ],
)
def test_rl_stops_when_a_later_ppo_epoch_diverges_and_keeps_a_finite_checkpoint(
    tmp_path, rl_run, monkeypatch, capsys, what, message
):
    """Step 2 (a checkpoint step) of a resumed RL run: its second PPO epoch's loss is NaN,
    or that epoch's update (its loss finite) leaves NaN parameters."""
    root, run = rl_run
    shutil.copytree(root, tmp_path, dirs_exist_ok=True)
    make_steps = learner.jit_rl_steps

    def diverging_steps(*args, **kwargs):
        rl_step, reference = make_steps(*args, **kwargs)
        calls = itertools.count()

        def step(state, batch, first_epoch):
            state, metrics, lp = rl_step(state, batch, first_epoch)
            if next(calls) == 1:  # step 2, epoch 2
                if what == "loss":
                    metrics = metrics | {"loss": metrics["loss"] * jnp.nan}
                else:
                    state = _poison(state)
            return state, metrics, lp

        return step, reference

    monkeypatch.setattr(learner, "jit_rl_steps", diverging_steps)
    capsys.readouterr()
    with pytest.raises(NonFiniteLoss, match=message):
        rl_program.train_arm(run, tmp_path / "rl_both", tmp_path / "warmup", "both", TOK)
    assert f"resuming {tmp_path / 'rl_both'} from step 1 of 3" in capsys.readouterr().out
    mngr = ckpt.manager(tmp_path / "rl_both")
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
    system, _ = learner.load_rl_system(tmp_path / "rl_both", tmp_path / "warmup")
    assert _finite(nnx.state(system))
