"""Run directories: resolved config, Orbax checkpoints of state + data iterator.

    WORKDIR/config.json      the resolved config (written once, checked on resume)
    WORKDIR/checkpoints/N/   Orbax: `state` (model + optimizer), `data` (iterator state)
    WORKDIR/drafter.safetensors   the drafter alone (`export_drafter`), on request

Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames on commit), so a run killed at any moment resumes from the last
finished step. Restores match the saved sharding to the given abstract state.
A step damaged later (a file deleted, truncated or garbled) is a
`DamagedCheckpoint` naming the file; `restore_latest` (training) moves such a
step to WORKDIR/checkpoints_damaged/ with a warning and resumes from the newest
intact one.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx
from jax.experimental import multihost_utils

from mtp.config import Run, resolve
from mtp.data.tokenizer import tokenizer_of
from mtp.errors import CheckpointError, ConfigError, DamagedCheckpoint
from mtp.files import atomic_write_text
from mtp.model.convert.drafter_file import save_drafter
from mtp.train.steps import init_train_state

# Sections whose values fix the shapes of the saved arrays.
SHAPE_SECTIONS = ("model", "drafter")


def config_path(workdir) -> Path:
    return Path(workdir) / "config.json"


def read_config(workdir) -> ml_collections.ConfigDict:
    path = config_path(workdir)
    if not path.exists():
        raise CheckpointError(f"{workdir}: not a run directory (no config.json); train there first")
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        saved = f"not valid JSON ({e})"
    if not isinstance(saved, dict):
        reason = saved if isinstance(saved, str) else "not a JSON object"
        raise CheckpointError(
            f"{path}: damaged, {reason}; delete it and rerun the train command to rewrite it"
        )
    return ml_collections.ConfigDict(saved)


def read_run(workdir) -> Run:
    """The resolved run of a run directory; a config.json that no longer resolves is one line."""
    try:
        return resolve(read_config(workdir))
    except ConfigError as e:
        raise CheckpointError(f"{config_path(workdir)}: {e}") from None


def check_compatible(run: Run, workdir) -> None:
    """Raises CheckpointError if WORKDIR holds checkpoints of a differently shaped model."""
    if not config_path(workdir).exists():
        return
    saved = read_run(workdir).to_dict()  # resolved: a field added since reads as its default
    new_run = run.to_dict()
    for section in SHAPE_SECTIONS:
        old, new = saved[section], new_run[section]
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if isinstance(a, list | tuple) and isinstance(b, list | tuple):
                a, b = list(a), list(b)
            if a != b and key != "dtype":
                raise CheckpointError(
                    f"{config_path(workdir)}: checkpoint written with {section}.{key}={a!r}, "
                    f"this config has {b!r}; use another --workdir or the same value"
                )


def write_run(run: Run, workdir) -> None:
    """Writes the resolved run as WORKDIR/config.json, atomically."""
    atomic_write_text(config_path(workdir), json.dumps(run.to_dict(), indent=2, sort_keys=True))


def manager(workdir, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager(
        Path(workdir).resolve() / "checkpoints",  # resolved: tensorstore refuses ".."
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
        },
    )


def _shapes(tree) -> dict[str, tuple]:
    """{'0/main/embed/embedding': shape} for a state or its checkpoint metadata."""

    def name(path):
        keys = [str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path]
        return "/".join(keys[:-1] if keys and keys[-1] == "value" else keys)

    return {name(p): tuple(x.shape) for p, x in jax.tree.leaves_with_path(tree)}


def _check_shapes(mngr, step: int, abstract_state) -> None:
    """CheckpointError naming the first array whose saved shape differs from this config's."""
    saved = _shapes(mngr.item_metadata(step)["state"])
    wanted = _shapes(abstract_state)
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a != b:
            raise CheckpointError(
                f"{mngr.directory}/{step}: checkpoint does not fit this config "
                f"({key}: saved {a}, this config {b})"
            )


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def _innermost(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


# TensorStore's error for bytes it cannot read ('DATA_LOSS: Error reading "KEY" in OCDBT ...').
_READ_ERROR = re.compile(r'^[A-Z_]+: Error (?:reading|opening|decoding) "([^"]*)"')


def damage(step_dir) -> str | None:
    """'FILE: what is wrong' for the first file of a saved step that is missing, empty,
    truncated or unparsable; None if all are whole. Reads only the index, not the arrays.

    The arrays live in an OCDBT database under `state/`: its manifest points at
    B-tree nodes, which point at (file, offset, length) of every value; a file
    shorter than a reference into it is truncated. Garbled bytes inside a whole
    file show only when the arrays are read (`restore`).
    """
    step_dir = Path(step_dir)
    state = step_dir / "state"
    for path in (state / "_METADATA", state / "manifest.ocdbt", step_dir / "data" / "metadata"):
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size == 0:
            return f"{path}: empty"
        if path.name != "manifest.ocdbt":
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                return f"{path}: not valid JSON ({_first_line(e)})"
    return _index(state)[0]


def _index(state: Path) -> tuple[str | None, dict[str, Path]]:
    """Walks the OCDBT index of `state/`: ('FILE: what is wrong' or None, {key: file of its
    value}). References read 'btreenode:PREFIX:FILE:OFFSET:LENGTH' (or 'value:...'); a
    node's keys follow the common prefix of its subtree."""
    kvstore = ts.KvStore.open({"driver": "file", "path": f"{state}/"}).result()
    files: dict[str, Path] = {}
    try:
        manifest = ts.ocdbt.dump(kvstore).result()
    except Exception as e:  # TensorStore raises plain Exceptions
        return f"{state / 'manifest.ocdbt'}: unreadable ({_first_line(_innermost(e))})", files
    root = manifest["versions"][-1]["root"] if manifest["versions"] else {}
    refs = [(root["location"], b"")] if "location" in root else []
    while refs:
        ref, key_prefix = refs.pop()
        kind, prefix, name, offset, length = ref.split(":")
        path, needed = state / prefix / name, int(offset) + int(length)
        if not path.is_file():
            return f"{path}: missing", files
        if path.stat().st_size < needed:
            size = path.stat().st_size
            return f"{path}: truncated ({size} bytes, the index reads up to {needed})", files
        if kind != "btreenode":
            files[key_prefix.decode(errors="replace")] = path
            continue
        try:
            node = ts.ocdbt.dump(kvstore, ref).result()
        except Exception as e:
            return f"{path}: unreadable ({_first_line(_innermost(e))})", files
        for entry in node["entries"]:
            if "location" in entry:  # an inner node: its subtree
                refs.append(
                    (entry["location"], key_prefix + entry.get("subtree_common_prefix", b""))
                )
            elif "indirect_value" in entry:  # a leaf's value stored in a data file
                refs.append((entry["indirect_value"], key_prefix + entry["key"]))
    return None, files


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, force=False) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Returns (state, data_state) of `step`; arrays placed as in `abstract_state`.

    DamagedCheckpoint names the damaged file; CheckpointError, the array that does not fit.
    """
    step_dir = Path(mngr.directory) / str(step)
    if (why := damage(step_dir)) is not None:
        raise DamagedCheckpoint(f"checkpoint step {step} is damaged: {why}")
    _check_shapes(mngr, step, abstract_state)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
    except Exception as e:
        cause = _innermost(e)
        if isinstance(cause, OSError) or (read := _READ_ERROR.match(str(cause))):
            key = read[1] if read else ""
            path = _index(step_dir / "state")[1].get(key, step_dir / "state")
            raise DamagedCheckpoint(
                f"checkpoint step {step} is damaged: {path}: unreadable ({_first_line(cause)})"
            ) from None
        if not isinstance(e, ValueError | KeyError):
            raise
        raise CheckpointError(
            f"{step_dir}: checkpoint does not fit this config ({_first_line(e, 200)})"
        ) from None
    return out.state, out.data


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
    """(step, state, data_state) of the newest intact step; (0, None, None) if there is none.

    Each damaged newer step is moved to WORKDIR/checkpoints_damaged/ (kept for a
    look, out of Orbax's way so that its step can be saved again), with a
    one-line warning on stderr naming the step and the damaged file.
    """
    for step in sorted(mngr.all_steps(), reverse=True):
        try:
            return step, *restore(mngr, step, abstract_state)
        except DamagedCheckpoint as e:
            aside = _move_aside(Path(mngr.directory), step)
            if jax.process_index() == 0:
                print(f"warning: {e}; moved it to {aside}", file=sys.stderr, flush=True)
            mngr.reload()
    return 0, None, None


def _move_aside(directory: Path, step: int) -> Path:
    """Moves `directory/step` to `directory`_damaged/ (process 0; the others wait)."""
    aside = directory.with_name(f"{directory.name}_damaged") / str(step)
    n = 1
    while aside.exists():  # damaged again after an earlier move
        aside, n = aside.with_name(f"{step}.{n}"), n + 1
    if jax.process_index() == 0:
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(directory / str(step), aside)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"mtp: moved damaged checkpoint step {step}")
    return aside


def abstract(state, shardings=None):
    """ShapeDtypeStructs of `state`, with shardings if given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def load_system(workdir, step: int | None = None):
    """The trained system of a supervised run directory (latest step by default) and its run.

    A damaged step is a DamagedCheckpoint naming the file, and the step to fall back to.
    """
    run = read_run(workdir)
    graphdef, state = init_train_state(run, tokenizer_of(run), abstract=True)
    mngr = manager(workdir)
    try:
        steps = mngr.all_steps()
        step = max(steps, default=None) if step is None else step
        if step is None:
            raise CheckpointError(f"{workdir}: no checkpoint yet; train there first")
        try:
            restored, _ = restore(mngr, step, state)
        except DamagedCheckpoint as e:
            older = [s for s in steps if s < step]
            hint = f"delete {mngr.directory}/{step} to load step {max(older)}"
            raise DamagedCheckpoint(f"{e}; {hint if older else 'train again'}") from None
    finally:
        mngr.close()
    system, _ = nnx.merge(graphdef, restored)
    return system, run


def export_drafter(workdir) -> tuple[Path, Run]:
    """Writes the drafter of a run directory's latest step, alone, to WORKDIR/drafter.safetensors
    (`mtp.model.convert.drafter_file`); returns the file and the run. Only a drafter trained on
    a frozen pretrained main model can start another run's drafter: any other main model's
    weights live in this run's checkpoint alone."""
    run = read_run(workdir)
    if not run.model.init_from or run.train.main_lr_scale:
        raise CheckpointError(
            f"{workdir}: its main model was trained there, so its drafter reads weights no other "
            "run has; a drafter file is for a frozen pretrained main model (model.init_from "
            "set, train.main_lr_scale=0)"
        )
    system, _ = load_system(workdir)
    return save_drafter(system, Path(workdir) / "drafter.safetensors"), run
