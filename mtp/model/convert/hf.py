"""Hugging Face checkpoint directories: config.json + model.safetensors (or shards listed in
model.safetensors.index.json), read and written with the `safetensors` package (numpy)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from mtp.errors import ConvertError
from mtp.model.convert.families import ARCHS, FAMILY_FIELDS

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


def _config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read the checkpoint config ({e})") from None


def _rope(c: dict, path: Path) -> tuple[float, tuple[float, ...]]:
    """(rope_base, rope_scaling) from `rope_parameters` (transformers 5) or the older
    `rope_theta` + `rope_scaling`."""
    params = dict(c.get("rope_scaling") or {}) | dict(c.get("rope_parameters") or {})
    base = float(params.get("rope_theta", c.get("rope_theta", 10_000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return base, ()
    if kind != "llama3":
        raise ConvertError(f"{path}: rope_type {kind!r} is not supported; allowed: default, llama3")
    old_len = params.get("original_max_position_embeddings", c.get("max_position_embeddings"))
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    return base, tuple(float(params[k]) for k in keys) + (float(old_len),)


def fields(directory: Path) -> dict:
    """ModelConfig fields (plus 'arch') fixed by the checkpoint in `directory`."""
    c, path = _config(directory), directory / "config.json"
    arch = (c.get("architectures") or [""])[0]
    if arch not in ARCHS:
        raise ConvertError(
            f"{path}: architecture {arch!r} is not supported; allowed: {', '.join(ARCHS)}"
        )
    family = ARCHS[arch]
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key) and family != "qwen2":
            raise ConvertError(f"{path}: {key}=true is not supported; allowed: false")
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    if window is not None:
        raise ConvertError(f"{path}: sliding_window={window} is not supported; allowed: null")
    act = c.get("hidden_activation") or c.get("hidden_act", "silu")
    if family == "gemma" and act == "gelu":  # legacy Gemma configs mean the tanh GELU
        act = "gelu_pytorch_tanh"
    if act not in ACTS:
        raise ConvertError(f"{path}: hidden_act {act!r} is not supported; allowed: {list(ACTS)}")
    d, n_heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or d // n_heads
    base, scaling = _rope(c, path)
    names = _tensor_files(directory)
    rows = _open(names["model.embed_tokens.weight"]).get_slice("model.embed_tokens.weight")
    return dict(
        arch=family,
        vocab_size=int(rows.get_shape()[0]),
        d_model=d,
        n_layers=c["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=c.get("num_key_value_heads") or n_heads,
        d_ff=c["intermediate_size"],
        d_head=0 if head_dim == d // n_heads else head_dim,
        rope_base=base,
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(c.get("tie_word_embeddings", family == "gemma")),
        mlp_act=ACTS[act],
        rope_scaling=scaling,
        **FAMILY_FIELDS[family],
    )


def _open(path: Path):
    try:
        return safe_open(str(path), framework="np")
    except Exception as e:  # safetensors raises its own error types for unreadable files
        raise ConvertError(f"{path}: cannot read safetensors ({e})") from None


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (directory / INDEX).exists():
        index = json.loads((directory / INDEX).read_text())["weight_map"]
        return {name: directory / file for name, file in index.items()}
    if not (directory / SINGLE).exists():
        raise ConvertError(f"{directory}: no {SINGLE} or {INDEX}")
    return dict.fromkeys(_open(directory / SINGLE).keys(), directory / SINGLE)


def tensors(directory: Path) -> tuple[dict[str, np.ndarray], dict[str, Path]]:
    """All tensors as float32 (HF names) and the file of each."""
    files, out = _tensor_files(directory), {}
    for file in sorted(set(files.values())):
        f = _open(file)
        for name in f.keys():
            dtype = f.get_slice(name).get_dtype()
            if dtype not in DTYPES:
                raise ConvertError(
                    f"{file}: tensor {name!r} has dtype {dtype}; allowed: {', '.join(DTYPES)}"
                )
            out[name] = f.get_tensor(name).astype(np.float32)
    return out, files


def write(directory: Path, hf: dict[str, np.ndarray], f: dict, max_len: int, dtype: str) -> None:
    """config.json + model.safetensors for the family `f['arch']`."""
    arch = next(a for a, fam in ARCHS.items() if fam == f["arch"])
    rope, n_pos = {"rope_type": "default", "rope_theta": f["rope_base"]}, max_len
    if f["rope_scaling"]:
        factor, low, high, old_len = f["rope_scaling"]
        n_pos = max(max_len, int(old_len * factor))  # the context the scaling extends to
        rope |= dict(rope_type="llama3", factor=factor, low_freq_factor=low)
        rope |= dict(high_freq_factor=high, original_max_position_embeddings=int(old_len))
    act = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}[f["mlp_act"]]
    config = {
        "architectures": [arch],
        "model_type": f["arch"],
        "vocab_size": f["vocab_size"],
        "hidden_size": f["d_model"],
        "intermediate_size": f["d_ff"],
        "num_hidden_layers": f["n_layers"],
        "num_attention_heads": f["n_heads"],
        "num_key_value_heads": f["n_kv_heads"],
        "head_dim": f["d_head"] or f["d_model"] // f["n_heads"],
        "hidden_act": act,
        "rms_norm_eps": f["norm_eps"],
        "rope_theta": f["rope_base"],
        "rope_parameters": rope,
        "max_position_embeddings": n_pos,
        "tie_word_embeddings": f["tie_embeddings"],
        "attention_bias": False,
        "dtype": dtype,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf, str(directory / SINGLE), metadata={"format": "pt"})
