"""The checkpoint families mtp's Transformer covers and the tensor mapping to its parameters.

Checkpoints are read into Hugging Face tensor names (`model.layers.{i}.self_attn.q_proj.weight`,
torch layout `(out, in)`, float32) and mapped to mtp's nnx state paths (`blocks.{i}.attn.q.kernel`,
layout `(in, out)`): q <- q_proj.T, kv <- [k_proj.T | v_proj.T], o <- o_proj.T,
gate_up <- [gate_proj.T | up_proj.T], down <- down_proj.T, norms as stored, head <- lm_head.T.
`to_hf` is the exact inverse.
"""

from __future__ import annotations

import numpy as np

from mtp.errors import ConvertError

# HF `architectures[0]` -> family; the family fixes what config.json cannot.
ARCHS = {
    "LlamaForCausalLM": "llama",  # also SmolLM
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GemmaForCausalLM": "gemma",
}
FAMILY_FIELDS = {
    "llama": dict(qkv_bias=False, norm_plus_one=False, embed_scale=False),
    "mistral": dict(qkv_bias=False, norm_plus_one=False, embed_scale=False),
    "qwen2": dict(qkv_bias=True, norm_plus_one=False, embed_scale=False),
    "gemma": dict(qkv_bias=False, norm_plus_one=True, embed_scale=True),
}
# Tensors some checkpoints carry that hold nothing mtp needs (recomputed RoPE buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

ATTN = "self_attn"
NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_shapes(f: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint with the fields `f` (see `checkpoint_fields`) must hold."""
    d, h = f["d_model"], f["d_head"] or f["d_model"] // f["n_heads"]
    q, kv, ff = f["n_heads"] * h, f["n_kv_heads"] * h, f["d_ff"]
    out = {"model.embed_tokens.weight": (f["vocab_size"], d), "model.norm.weight": (d,)}
    if not f["tie_embeddings"]:
        out["lm_head.weight"] = (f["vocab_size"], d)
    for i in range(f["n_layers"]):
        p = f"model.layers.{i}."
        out |= {p + name + ".weight": (d,) for name in NORMS.values()}
        out |= {
            f"{p}{ATTN}.q_proj.weight": (q, d),
            f"{p}{ATTN}.k_proj.weight": (kv, d),
            f"{p}{ATTN}.v_proj.weight": (kv, d),
            f"{p}{ATTN}.o_proj.weight": (d, q),
            f"{p}mlp.gate_proj.weight": (ff, d),
            f"{p}mlp.up_proj.weight": (ff, d),
            f"{p}mlp.down_proj.weight": (d, ff),
        }
        if f["qkv_bias"]:
            out |= {f"{p}{ATTN}.q_proj.bias": (q,)}
            out |= {f"{p}{ATTN}.{x}_proj.bias": (kv,) for x in "kv"}
    return out


def check_tensors(tensors: dict[str, np.ndarray], f: dict, where) -> dict[str, np.ndarray]:
    """The tensors `hf_shapes(f)` asks for, shapes checked; `where(name)` names the file.

    A tied checkpoint may still store `lm_head.weight` if it equals the embedding."""
    want = hf_shapes(f)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    head = tensors.get("lm_head.weight")
    emb = tensors.get("model.embed_tokens.weight")
    if f["tie_embeddings"] and head is not None and emb is not None and np.array_equal(head, emb):
        del tensors["lm_head.weight"]
    for name in want:
        if name not in tensors:
            raise ConvertError(f"{where(None)}: missing tensor {name!r}")
    for name in tensors:
        if name not in want:
            raise ConvertError(
                f"{where(name)}: unexpected tensor {name!r}; a {f['arch']} checkpoint with these "
                f"fields holds only embed_tokens, layers.N.{{norms, q/k/v/o_proj, mlp}}, norm"
                + ("" if f["tie_embeddings"] else ", lm_head")
            )
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ConvertError(
                f"{where(name)}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                f"expected {shape}"
            )
    return tensors


def from_hf(t: dict[str, np.ndarray], f: dict) -> dict[str, np.ndarray]:
    """HF-named tensors (checked by `check_tensors`) -> mtp state paths, float32."""
    out = {
        "embed.embedding": t["model.embed_tokens.weight"],
        "final_norm.scale": t["model.norm.weight"],
    }
    if not f["tie_embeddings"]:
        out["head.kernel"] = t["lm_head.weight"].T
    for i in range(f["n_layers"]):
        p, m = f"model.layers.{i}.", f"blocks.{i}."
        a = p + ATTN + "."
        for mine, theirs in NORMS.items():
            out[f"{m}{mine}.scale"] = t[f"{p}{theirs}.weight"]
        out[m + "attn.q.kernel"] = t[a + "q_proj.weight"].T
        out[m + "attn.kv.kernel"] = np.concatenate(
            [t[a + "k_proj.weight"].T, t[a + "v_proj.weight"].T], 1
        )
        out[m + "attn.o.kernel"] = t[a + "o_proj.weight"].T
        if f["qkv_bias"]:
            out[m + "attn.q.bias"] = t[a + "q_proj.bias"]
            out[m + "attn.kv.bias"] = np.concatenate([t[a + "k_proj.bias"], t[a + "v_proj.bias"]])
        out[m + "mlp.gate_up.kernel"] = np.concatenate(
            [t[p + "mlp.gate_proj.weight"].T, t[p + "mlp.up_proj.weight"].T], 1
        )
        out[m + "mlp.down.kernel"] = t[p + "mlp.down_proj.weight"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def to_hf(w: dict[str, np.ndarray], f: dict) -> dict[str, np.ndarray]:
    """mtp state paths -> HF-named tensors (the inverse of `from_hf`)."""
    out = {
        "model.embed_tokens.weight": w["embed.embedding"],
        "model.norm.weight": w["final_norm.scale"],
    }
    if not f["tie_embeddings"]:
        out["lm_head.weight"] = w["head.kernel"].T
    for i in range(f["n_layers"]):
        p, m = f"model.layers.{i}.", f"blocks.{i}."
        a = p + ATTN + "."
        for mine, theirs in NORMS.items():
            out[f"{p}{theirs}.weight"] = w[f"{m}{mine}.scale"]
        out[a + "q_proj.weight"] = w[m + "attn.q.kernel"].T
        k, v = np.split(w[m + "attn.kv.kernel"], 2, axis=1)
        out[a + "k_proj.weight"], out[a + "v_proj.weight"] = k.T, v.T
        out[a + "o_proj.weight"] = w[m + "attn.o.kernel"].T
        if f["qkv_bias"]:
            out[a + "q_proj.bias"] = w[m + "attn.q.bias"]
            out[a + "k_proj.bias"], out[a + "v_proj.bias"] = np.split(w[m + "attn.kv.bias"], 2)
        gate, up = np.split(w[m + "mlp.gate_up.kernel"], 2, axis=1)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate.T, up.T
        out[p + "mlp.down_proj.weight"] = w[m + "mlp.down.kernel"].T
    return {k: np.ascontiguousarray(v) for k, v in out.items()}
