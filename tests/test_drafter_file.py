"""A drafter file (`drafter.init_from`): the drafter of one run starts another's exactly, on the
same frozen pretrained main model; a file for another drafter or main model is refused in one
line that names the fields."""

import jax
import numpy as np
import pytest
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import ConfigError, resolve
from mtp.errors import CheckpointError, ConvertError
from mtp.model.convert.drafter_file import load_drafter, save_drafter
from tests.test_files import Killed, killed_at_rename  # noqa: F401 (a fixture)
from tests.test_pretrained import _checkpoint, _config, _shaped_system
from tests.test_train import tiny_config


def _leaves(module) -> dict:
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(module))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A pretrained-main system whose drafter and draft vocabulary are not a fresh init's,
    saved to a drafter file: (hf dir, file, system)."""
    tmp = tmp_path_factory.mktemp("drafter_file")
    hf = _checkpoint(tmp / "hf")
    _, _, system = _shaped_system(_config(hf))
    rng = np.random.default_rng(1)
    for _, var in nnx.to_flat_state(nnx.state(system.drafter)):
        var[...] = rng.normal(size=var.shape).astype(var.dtype)
    system.set_draft_ids(rng.permutation(np.asarray(system.ids())))
    return hf, save_drafter(system, tmp / "out" / "drafter.safetensors"), system


def test_a_drafter_file_starts_another_runs_drafter_exactly(trained):
    """... and a run that trains it on jointly with the main model (Medusa-2) may start from it."""
    hf, path, system = trained
    c = _config(hf)
    c.drafter.update(init_from=str(path), head="shared", detach=False)
    _, _, loaded = _shaped_system(c)
    _, _, fresh = _shaped_system(_config(hf))
    want, got = _leaves(system.drafter), _leaves(loaded.drafter)
    assert want.keys() == got.keys() and len(want) > 4
    for p in want:
        np.testing.assert_array_equal(got[p], want[p], err_msg=str(p))
    np.testing.assert_array_equal(loaded.ids(), system.ids())
    jax.tree.map(np.testing.assert_array_equal, _leaves(loaded.main), _leaves(fresh.main))
    assert path.stat().st_size < 4 * sum(a.size for a in want.values()) + 10_000  # no main


@pytest.mark.usefixtures("killed_at_rename")
def test_a_drafter_export_killed_before_its_rename_leaves_the_old_file(trained, tmp_path):
    _, path, system = trained
    old = tmp_path / "drafter.safetensors"
    old.write_bytes(path.read_bytes())
    with pytest.raises(Killed):
        save_drafter(system, old)
    assert old.read_bytes() == path.read_bytes() and [p.name for p in tmp_path.iterdir()] == [
        old.name
    ]


@pytest.mark.parametrize(
    "over, names",
    [
        ({"drafter.k": 3}, "drafter.k=2 (this config: 3)"),
        ({"drafter.n_heads": 4}, "drafter.n_heads=2 (this config: 4)"),
        ({"drafter.head": "own"}, "drafter.head='shared' (this config: 'own')"),
        ({"model.taps": (0,)}, "main.taps=[-1] (this config: [0])"),
    ],
)
def test_a_drafter_file_for_another_drafter_or_main_model_is_refused(trained, over, names):
    hf, path, _ = trained
    c = _config(hf)
    for field, value in over.items():
        section, name = field.split(".")
        c[section].update({name: value})
    _, _, system = _shaped_system(c)
    with pytest.raises(ConvertError, match=r"drafter.init_from=.*trained with .*") as e:
        load_drafter(system, path)
    assert names in str(e.value) and "\n" not in str(e.value)


def test_a_file_that_is_not_a_drafter_file_is_refused(trained, tmp_path):
    hf, _, system = trained
    with pytest.raises(ConvertError, match="not a drafter file"):
        load_drafter(system, hf / "model.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08\x00\x00")
    with pytest.raises(ConvertError, match="cannot read it as a safetensors file"):
        load_drafter(system, tmp_path / "cut.safetensors")
    c = _config(hf)
    c.drafter.update(init_from="drafter.npz")
    with pytest.raises(ConfigError, match=r"drafter.init_from: a drafter file \(.safetensors\)"):
        resolve(c)


@pytest.mark.parametrize("joint", [False, True], ids=["scratch", "joint"])
def test_only_a_frozen_pretrained_main_models_drafter_is_exported(tmp_path, trained, joint):
    """`--mode=export_drafter` on a run whose main model was trained there is one line: no
    other run has the weights its drafter reads."""
    hf, _, _ = trained
    ckpt.write_run(resolve(_config(hf, main_lr_scale=0.1) if joint else tiny_config()), tmp_path)
    with pytest.raises(CheckpointError, match="its main model was trained there"):
        ckpt.export_drafter(tmp_path)
