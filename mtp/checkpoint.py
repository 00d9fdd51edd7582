"""Run directories: resolved config, Orbax checkpoints of state + data iterator.

    WORKDIR/config.json      the resolved config (written once, checked on resume)
    WORKDIR/checkpoints/N/   Orbax: `state` (model + optimizer), `data` (iterator state)

Saves are asynchronous and atomic (Orbax writes to a temporary directory and
renames on commit), so a run killed at any moment resumes from the last
finished step. Restores match the saved sharding to the given abstract state.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from mtp.config import UserError, validate

# Sections whose values fix the shapes of the saved arrays.
SHAPE_SECTIONS = ("model", "drafter")


def config_path(workdir) -> Path:
    return Path(workdir) / "config.json"


def read_config(workdir) -> ml_collections.ConfigDict:
    path = config_path(workdir)
    if not path.exists():
        raise UserError(f"{workdir}: not a run directory (no config.json); train there first")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def check_compatible(config, workdir) -> None:
    """Raises UserError if WORKDIR holds checkpoints of a differently shaped model."""
    if not config_path(workdir).exists():
        return
    saved = read_config(workdir)
    for section in SHAPE_SECTIONS:
        old, new = saved[section].to_dict(), config[section].to_dict()
        for key in sorted(set(old) | set(new)):
            a, b = old.get(key), new.get(key)
            if isinstance(a, list | tuple) and isinstance(b, list | tuple):
                a, b = list(a), list(b)
            if a != b and key != "dtype":
                raise UserError(
                    f"{config_path(workdir)}: checkpoint written with {section}.{key}={a!r}, "
                    f"this config has {b!r}; use another --workdir or the same value"
                )


def write_config(config, workdir) -> None:
    path = config_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.rename(path)  # atomic


def manager(workdir, keep: int = 3) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
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
    """UserError naming the first array whose saved shape differs from this config's."""
    saved = _shapes(mngr.item_metadata(step)["state"])
    wanted = _shapes(abstract_state)
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if a != b:
            raise UserError(
                f"{mngr.directory}/{step}: checkpoint does not fit this config "
                f"({key}: saved {a}, this config {b})"
            )


def save(mngr: ocp.CheckpointManager, step: int, state, data_state: dict, force=False) -> None:
    mngr.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        ),
        force=force,
    )


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
    """Returns (state, data_state) of `step`; arrays placed as in `abstract_state`."""
    _check_shapes(mngr, step, abstract_state)
    try:
        out = mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
    except (ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"{mngr.directory}/{step}: checkpoint does not fit this config ({first[:200]})"
        ) from None
    return out.state, out.data


def abstract(state, shardings=None):
    """ShapeDtypeStructs of `state`, with shardings if given."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def load_system(workdir, step: int | None = None):
    """The trained system of a run directory (latest step by default) and its config."""
    from mtp.train.steps import init_train_state  # avoid an import cycle at module load

    config = read_config(workdir)
    cs = validate(config)
    graphdef, state = init_train_state(cs, abstract=True)
    mngr = manager(workdir)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise UserError(f"{workdir}: no checkpoint yet; train there first")
    restored, _ = restore(mngr, step, state)
    mngr.close()
    system, _ = nnx.merge(graphdef, restored)
    return system, config
