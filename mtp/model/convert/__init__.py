"""Pretrained checkpoints into mtp's main model and back.

Sources are 'hf:DIR' (a Hugging Face directory: Llama/SmolLM, Mistral, Qwen2, Gemma) or
'gguf:FILE' (llama.cpp, llama architecture). `checkpoint_fields` gives the ModelConfig fields
the checkpoint fixes, `read_weights` its tensors as float32 keyed by mtp's nnx state paths
('blocks.0.attn.kv.kernel', ...), `load_into` copies them into a Transformer built with those
fields (a larger vocabulary gets the extra rows set to the mean row), `export_hf` writes a
Transformer as a Hugging Face directory, `export_gguf` as a float32 or float16 GGUF file.
Every problem is a one-line ConvertError.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.errors import ConvertError
from mtp.model.convert.families import FAMILY_FIELDS, check_tensors, from_hf, to_hf
from mtp.model.convert.gguf_file import read as read_gguf
from mtp.model.convert.gguf_file import write as write_gguf
from mtp.model.convert.hf import fields as hf_fields
from mtp.model.convert.hf import tensors as hf_tensors
from mtp.model.convert.hf import write as write_hf
from mtp.model.transformer import Transformer

# Parameters a checkpoint never holds: they keep the model's own init.
OWN_PARAMS = ("registers", "urgency")
# What a row of the vocabulary is in each parameter (axis), for a vocabulary grown by specials.
VOCAB_AXIS = {"embed.embedding": 0, "head.kernel": 1}


def _split(source: str) -> tuple[str, Path]:
    kind, _, rest = source.partition(":")
    if kind not in ("hf", "gguf") or not rest:
        raise ConvertError(f"model.init_from: {source!r} is not 'hf:DIR' or 'gguf:FILE'")
    path = Path(rest).expanduser()
    if not path.exists():
        raise ConvertError(f"model.init_from: {path} does not exist")
    return kind, path


def _read(source: str) -> tuple[dict, dict[str, np.ndarray], object]:
    """(fields plus 'arch', HF-named tensors, name -> file for messages)."""
    kind, path = _split(source)
    if kind == "gguf":
        f, tensors = read_gguf(path)
        return f, tensors, lambda name: path
    f = hf_fields(path)
    tensors, files = hf_tensors(path)
    return f, tensors, lambda name: files.get(name, path)


def checkpoint_fields(source: str) -> dict:
    """The ModelConfig fields the checkpoint fixes (shapes, family, RoPE, norm eps, tying)."""
    kind, path = _split(source)
    f = dict(hf_fields(path) if kind == "hf" else read_gguf(path, with_tensors=False)[0])
    del f["arch"]
    return f


def read_weights(source: str) -> dict[str, np.ndarray]:
    """float32 arrays keyed by mtp state paths ('embed.embedding', 'blocks.0.attn.q.kernel')."""
    f, tensors, where = _read(source)
    return from_hf(check_tensors(tensors, f, where), f)


def _params(model: Transformer) -> dict[str, nnx.Variable]:
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): var for path, var in flat}


def _grow(name: str, w: np.ndarray, rows: int) -> np.ndarray:
    """Append rows (along the vocab axis) equal to the mean row."""
    axis = VOCAB_AXIS[name]
    extra = rows - w.shape[axis]
    mean = w.mean(axis=axis, keepdims=True)
    return np.concatenate([w, np.repeat(mean, extra, axis=axis)], axis=axis)


def load_into(model: Transformer, weights: dict[str, np.ndarray], *, source: str) -> None:
    """Copy `weights` (from `read_weights(source)`) into the model's Params, in its param_dtype.

    Registers and urgency keep their init; a model vocabulary larger than the checkpoint's
    gets its extra embedding (and untied head) rows set to the mean row."""
    params, vocab = _params(model), model.cfg.vocab_size
    wanted = {k for k in params if k.split(".")[0] not in OWN_PARAMS}
    for name in sorted(wanted - weights.keys()):
        raise ConvertError(f"{source}: missing tensor for {name!r} (the model config has it)")
    for name in sorted(weights.keys() - wanted):
        raise ConvertError(
            f"{source}: unexpected tensor {name!r} (the model config has none; "
            "is model.tie_embeddings / qkv_bias set from the checkpoint?)"
        )
    new = {}
    for name in sorted(wanted):
        w, want = np.asarray(weights[name], np.float32), tuple(params[name].shape)
        if name in VOCAB_AXIS:
            rows = w.shape[VOCAB_AXIS[name]]
            if rows > vocab:
                raise ConvertError(
                    f"{source}: the checkpoint has {rows} vocabulary rows but model.vocab_size "
                    f"is {vocab}; allowed: vocab_size >= {rows}"
                )
            if w.ndim == len(want) and rows < vocab:
                w = _grow(name, w, vocab)
        if w.shape != want:
            raise ConvertError(
                f"{source}: tensor {name!r} has shape {w.shape}, the model config expects {want}"
            )
        new[name] = jnp.asarray(w, params[name].dtype)
    for name, value in new.items():
        params[name].set_value(value)


def _export_fields(model: Transformer, arch: str, where) -> tuple[dict, dict[str, np.ndarray]]:
    """(fields, HF-named numpy tensors) of the model as a checkpoint of family `arch`."""
    cfg = model.cfg
    allowed = ("llama", "qwen2", "gemma")
    if arch not in allowed:
        raise ConvertError(f"{where}: export arch {arch!r} is not one of {allowed}")
    want = FAMILY_FIELDS[arch] | dict(mlp_act="gelu_tanh" if arch == "gemma" else "silu")
    bad = [f"{k}={getattr(cfg, k)}" for k, v in want.items() if getattr(cfg, k) != v]
    bad += [f"{k}={getattr(cfg, k)}" for k in ("n_registers", "use_urgency") if getattr(cfg, k)]
    if bad:
        raise ConvertError(
            f"{where}: a {arch} checkpoint cannot hold model {', '.join(bad)}; allowed: "
            + ", ".join(f"{k}={v}" for k, v in want.items())
            + ", n_registers=0, use_urgency=False"
        )
    f = dict(want, arch=arch, vocab_size=cfg.vocab_size, d_model=cfg.d_model)
    f |= dict(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads)
    f |= dict(d_ff=cfg.ff_dim, d_head=cfg.d_head, rope_base=cfg.rope_base)
    f |= dict(norm_eps=cfg.norm_eps, tie_embeddings=cfg.tie_embeddings)
    f |= dict(rope_scaling=cfg.rope_scaling)
    weights = {name: np.asarray(var[...]) for name, var in _params(model).items()}
    return f, to_hf(weights, f)


def export_hf(model: Transformer, directory, arch: str = "llama") -> None:
    """Write the model as a Hugging Face checkpoint (config.json + model.safetensors) of the
    family `arch` ('llama', 'qwen2', 'gemma'), in its param_dtype; importing it is exact."""
    directory = Path(directory)
    f, hf = _export_fields(model, arch, directory)
    write_hf(directory, hf, f, model.cfg.max_len, model.cfg.param_dtype)


def export_gguf(model: Transformer, path, dtype: str, tokenizer_from, added_tokens=()) -> None:
    """Write a llama model as a GGUF file for llama.cpp, its matrices in `dtype` ('float32'
    or 'float16'), with the tokenizer of the GGUF `tokenizer_from` plus `added_tokens` (the
    strings of the rows past it); importing a float32 file is exact."""
    path = Path(path)
    f, hf = _export_fields(model, "llama", path)
    write_gguf(path, hf, f, model.cfg.max_len, dtype, Path(tokenizer_from), tuple(added_tokens))
