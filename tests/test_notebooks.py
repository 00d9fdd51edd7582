"""Every notebook runs end to end, headless, at a tiny size; the repository keeps them clean.

Each notebook has a cell tagged `parameters` (papermill style); the test
inserts a cell after it that shrinks the run, and executes the notebook with
nbclient in a fresh kernel of this Python, in a temporary directory.
"""

import json
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

SMALL_MODEL = {  # experiments/tiny.py shrunk to seconds, as in test_train.tiny_config
    "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2, "model.n_kv_heads": 1,
    "model.max_len": 64, "drafter.k": 2, "drafter.n_heads": 2, "data.seq_len": 32,
    "data.batch_size": 4, "data.max_bytes": 60_000, "train.warmup_steps": 2,
    "train.log_every": 2, "train.eval_every": 3, "train.eval_batches": 2,
}  # fmt: skip

# Parameters per notebook, set after its `parameters` cell.
PARAMETERS = {
    "quickstart": {"STEPS": 6, "OVERRIDES": SMALL_MODEL, "MAX_NEW_TOKENS": 16},
    "sweep_k": {"SWEEP_DIR": "sweep", "CONFIG_ARG": "tiny",
                "SWEEP": {"ks": (1, 2), "kinds": ("transformer",)}},
    "rl_fast_thinking": {"CONFIG_ARG": "smoke", "EVAL_PROBLEMS": 8, "BUDGETS": (4, 0)},
}  # fmt: skip


@pytest.fixture
def kernel_of_this_python(tmp_path, monkeypatch):
    """A 'python3' kernelspec running sys.executable, ahead of any user-installed one."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    return "python3"


def with_parameters(nb, params: dict):
    cells = nb.cells
    at = next(i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", []))
    source = "\n".join(f"{name} = {value!r}" for name, value in params.items())
    cells.insert(at + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected"]}))
    return nb


# The RL notebook takes two minutes; CI runs the same warm-up + RL pipeline in
# tests/test_rl_loop.py, so it runs with --runslow.
SLOW = {"rl_fast_thinking"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW else p for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_runs_end_to_end(path, tmp_path, kernel_of_this_python):
    nb = with_parameters(nbformat.read(path, as_version=4), PARAMETERS[path.stem])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = NotebookClient(
        nb,
        timeout=300,
        kernel_name=kernel_of_this_python,
        resources={"metadata": {"path": str(run_dir)}},
    )
    client.execute()  # raises CellExecutionError with the cell's traceback on failure
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_notebooks_are_stored_without_outputs_and_match_their_scripts():
    assert {p.stem for p in NOTEBOOKS} >= {"quickstart", "sweep_k", "rl_fast_thinking"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name
        paired = jupytext.read(path.with_suffix(".py"))
        assert [c.source for c in paired.cells] == [c.source for c in nb.cells], (
            f"{path.name} and {path.with_suffix('.py').name} differ; run "
            f"`jupytext --sync {path.with_suffix('.py')}`"
        )
        assert "parameters" in str([c.metadata for c in nb.cells]), path.name
