"""Config resolution, checkpoints, and train_and_evaluate end to end."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mtp import checkpoint as ckpt
from mtp.config import ConfigError, UserError, default_config, resolve
from mtp.data.task_data import check_tasks
from mtp.data.tokenizer import ByteTokenizer
from mtp.errors import NonFiniteLoss
from mtp.metrics import compare_runs, read_csv
from mtp.train import supervised
from mtp.train.steps import init_train_state, jit_steps

TOK = ByteTokenizer()


def tiny_config(**overrides):
    """A model small enough to train a few steps in seconds."""
    c = default_config()
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_len=64)
    c.drafter.update(k=2, n_heads=2)
    c.data.update(seq_len=32, batch_size=4, max_bytes=60_000)
    c.train.update(steps=12, lr=1e-2, warmup_steps=2, log_every=3, eval_every=6, eval_batches=2,
                   checkpoint_every=6)  # fmt: skip
    for key, value in overrides.items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def train_and_evaluate(config, workdir):
    """The supervised program on `config` (a ConfigDict) in `workdir`."""
    return supervised.train_and_evaluate(resolve(config), workdir, TOK)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("drafter.k", 0, "drafter.k: must be >= 1"),
        ("model.taps", (5,), "model.taps: layer 5 is outside the model; allowed 0..1"),
        ("data.seq_len", 128, "data.seq_len: 128 is above the model's maximum"),
        ("drafter.kind", "lstm", "drafter.kind: 'lstm' not in"),
        ("train.sharding", "tp", "train.sharding: 'tp' not in"),
        ("data.corpus", "http://x", "data.corpus: 'http://x' is not one of"),
    ],
)
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve(tiny_config(**{field: value}))
    assert "\n" not in str(e.value)


def test_unknown_field_is_named_with_the_allowed_ones():
    c = tiny_config()
    c.model.unlock()
    c.model.d_modle = 3
    with pytest.raises(ConfigError, match="model.d_modle: unknown field; allowed: .*d_model"):
        resolve(c)


def test_every_experiment_config_validates():
    import importlib.util
    import pathlib

    files = sorted(pathlib.Path(__file__).parent.parent.glob("experiments/*.py"))
    assert files
    for path in files:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for arg in (None, *getattr(module, "VARIANTS", ())):  # every documented variant too
            check_tasks(resolve(module.get_config(arg)))


def _fixed_batch(seq_len=32, batch=4):
    text = np.frombuffer(b"def add(a, b):\n    return a + b\n" * 20, np.uint8).astype(np.int32)
    rows = np.stack([text[i : i + seq_len] for i in range(batch)])
    return {"tokens": rows, "loss_mask": np.ones_like(rows, np.float32)}


def test_checkpoint_round_trip(tmp_path):
    run = resolve(tiny_config())
    graphdef, state = init_train_state(run, TOK)
    train_step, _ = jit_steps(graphdef, run.train)
    state, _ = train_step(state, _fixed_batch())
    expected = jax.tree.map(np.asarray, state)
    mngr = ckpt.manager(tmp_path, keep=2)
    ckpt.save(mngr, 1, state, {"next_index": 7})
    mngr.wait_until_finished()
    _, abstract_state = init_train_state(run, TOK, abstract=True)
    restored, data_state = ckpt.restore(mngr, 1, abstract_state)
    mngr.close()
    assert data_state == {"next_index": 7}
    jax.tree.map(np.testing.assert_array_equal, expected, jax.tree.map(np.asarray, restored))
    # a differently shaped model cannot restore it, with a one-line error
    other = resolve(tiny_config(**{"model.d_model": 64}))
    _, wrong = init_train_state(other, TOK, abstract=True)
    with pytest.raises(UserError, match="does not fit this config") as e:
        ckpt.restore(ocp.CheckpointManager(tmp_path / "checkpoints"), 1, wrong)
    assert "\n" not in str(e.value)


def test_train_and_evaluate_end_to_end_and_resume(tmp_path, capsys):
    c = tiny_config()
    results = train_and_evaluate(c, tmp_path)
    assert results["main_loss"] < 5.0  # from ~ln(264) = 5.6 at init
    assert ckpt.manager(tmp_path).latest_step() == 12
    report = json.loads((tmp_path / "eval_report.json").read_text())
    assert report["step"] == 12 and "acc_draft_1" in report and "accepted_len" in report
    rows = (tmp_path / "metrics" / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 4  # logged at 3, 6, 9, 12
    assert (tmp_path / "config.json").exists() and list((tmp_path / "tensorboard").iterdir())
    # the same command again resumes the finished run, saying so: no step is trained twice
    capsys.readouterr()
    again = train_and_evaluate(c, tmp_path)
    assert f"resuming {tmp_path} from step 12 of 12\n" in capsys.readouterr().out
    assert again["main_loss"] == pytest.approx(results["main_loss"], rel=1e-6)
    assert len((tmp_path / "metrics" / "train.csv").read_text().splitlines()) == 5
    # runs compare side by side; a re-logged step (after kill -9) reads once, the last row winning
    table = compare_runs([str(tmp_path), str(tmp_path)])
    assert table.splitlines()[2].startswith("| step | 12 | 12 |") and "| main_loss |" in table
    with (tmp_path / "metrics" / "train.csv").open("a") as f:
        f.write("3" + ",0" * (len(rows[0].split(",")) - 1) + "\n")
    steps = [(r["step"], r["loss"]) for r in read_csv(tmp_path, "train")]
    assert [s for s, _ in steps] == [3, 6, 9, 12] and steps[0][1] == 0
    # an incompatible config is refused before anything is written
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(UserError, match="model.d_model=32, this config has 64"):
        train_and_evaluate(tiny_config(**{"model.d_model": 64}), tmp_path)
    assert (tmp_path / "config.json").read_text() == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    c = tiny_config(**{"train.lr": 1e30, "train.warmup_steps": 0, "train.log_every": 1,
                       "train.checkpoint_every": 1, "train.grad_clip": 1e30})  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) at step \d+") as e:
        train_and_evaluate(c, tmp_path)
    bad_step = int(str(e.value).split("at step ")[1].split()[0])
    mngr = ckpt.manager(tmp_path)
    assert 0 < max(mngr.all_steps()) < bad_step
    _, abstract_state = init_train_state(resolve(c), TOK, abstract=True)
    good, _ = ckpt.restore(mngr, max(mngr.all_steps()), abstract_state)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(good))
