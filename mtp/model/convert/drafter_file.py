"""A trained drafter as one file, apart from its main model (`drafter.init_from`).

EAGLE and Medusa publish a drafter as a few megabytes beside a main model of hundreds; so
does this: a safetensors file holds the drafter's variables (`drafter.<path>`) and its draft
vocabulary (`draft_ids`, when trimmed), and its metadata the drafter config and the main
model fields the drafter depends on (`MAIN_FIELDS`). `save_drafter` writes it atomically;
`load_drafter` puts it into a system whose drafter config and main model agree, or says in
one line which fields do not.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from mtp.errors import ConvertError
from mtp.files import atomic_write

FORMAT = "mtp-drafter-1"
# What the drafter reads of its main model: the weights it was trained on (init_from), the
# taps' layers and width, and the vocabulary its ids index.
MAIN_FIELDS = ("init_from", "vocab_size", "d_model", "n_layers", "taps")
# Drafter fields a file need not match: where the drafter starts and whether gradients reach
# the main model (a drafter trained frozen may go on training jointly), not what it computes.
FREE_FIELDS = ("init_from", "detach")


def _describe(system) -> dict:
    """The metadata that must match between a file and the system it loads into (JSON form)."""
    cfg = system.drafter_cfg
    drafter = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_FIELDS}
    drafter["head"] = "own" if cfg.head == "own" else "shared"  # frozen or not: the same tables
    main = {f: getattr(system.main.cfg, f) for f in MAIN_FIELDS}
    return json.loads(json.dumps({"drafter": drafter, "main": main}))


def _variables(system) -> dict[str, nnx.Variable]:
    """The drafter's variables by file key."""
    flat = nnx.to_flat_state(nnx.state(system.drafter))
    return {"drafter." + ".".join(map(str, path)): var for path, var in flat}


def save_drafter(system, path) -> Path:
    """Writes the drafter of `system` (an `MTPSystem`) to `path` (.safetensors); returns it."""
    path = Path(path)
    tensors = {k: np.asarray(v[...]) for k, v in _variables(system).items()}
    if system.draft_ids is not None:
        tensors["draft_ids"] = np.asarray(system.ids())
    meta = {"format": FORMAT, "mtp": json.dumps(_describe(system))}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_drafter(system, path) -> None:
    """Sets the drafter (and draft vocabulary) of `system` from a `save_drafter` file."""
    where = f"drafter.init_from={path}"
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as e:
        raise ConvertError(f"{where}: cannot read it as a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ConvertError(f"{where}: not a drafter file (no {FORMAT!r} metadata)")
    theirs, ours = json.loads(meta["mtp"]), _describe(system)
    diffs = [
        f"{part}.{name}={theirs[part].get(name)!r} (this config: {value!r})"
        for part in ("drafter", "main")
        for name, value in ours[part].items()
        if theirs[part].get(name) != value
    ]
    if diffs:
        raise ConvertError(f"{where}: the file's drafter was trained with " + ", ".join(diffs))
    variables = _variables(system)
    missing = sorted(set(variables) - set(tensors))
    if missing:
        raise ConvertError(f"{where}: the file lacks {', '.join(missing)}")
    for key, var in variables.items():
        if tensors[key].shape != var.shape:
            raise ConvertError(f"{where}: {key} is {tensors[key].shape}, expected {var.shape}")
        var[...] = tensors[key].astype(var.dtype)
    if system.draft_ids is not None:
        system.set_draft_ids(tensors["draft_ids"])
