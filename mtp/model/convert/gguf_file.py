"""GGUF files (llama.cpp) of the `llama` architecture, read with the `gguf` package.

Tensors are dequantised to float32 and renamed to Hugging Face names; llama.cpp stores the
Q and K projections with each head's rotary halves interleaved, which is undone here (and
redone by `write`, which writes float32 or float16 files for llama.cpp). Llama 3
RoPE scaling arrives as a `rope_freqs` tensor of per-frequency factors; it is accepted when it
equals the Llama 3.x scaling (low_freq_factor 1, high_freq_factor 4, original length 8192)
with its largest factor.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from mtp.errors import ConvertError
from mtp.model.convert.families import ATTN

LLAMA3 = (1.0, 4.0, 8192.0)  # low_freq_factor, high_freq_factor, original_max_len
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": f"{ATTN}.q_proj",
    "attn_k": f"{ATTN}.k_proj",
    "attn_v": f"{ATTN}.v_proj",
    "attn_output": f"{ATTN}.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _reader(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read GGUF ({e})") from None


def _meta(r: gguf.GGUFReader, path: Path, key: str, default=None):
    field = r.fields.get(key)
    if field is None:
        if default is None:
            raise ConvertError(f"{path}: missing metadata {key!r}")
        return default
    return field.contents()


def _f32(x) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not
    9.99999974e-06), as the HF config of the same model writes it."""
    return float(str(np.float32(x)))


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary order (rows, in) back to HF's rotate-half order."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half order (rows, in) to llama.cpp's interleaved one; undoes `unpermute`."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _dequantize(t, path: Path) -> np.ndarray:
    try:
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    except NotImplementedError:
        raise ConvertError(
            f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which the gguf "
            "package cannot dequantise; allowed: F32, F16, BF16, Q8_0, Q4_K, ..."
        ) from None


def _rope_scaling(t, h: int, base: float, path: Path) -> tuple[float, ...]:
    """The Llama 3 scaling tuple whose per-frequency factors are the tensor `t` (H/2,)."""
    freqs = _dequantize(t, path)
    factor = float(freqs.max())
    want_f = llama3_factors(h, base, factor)
    if freqs.shape != want_f.shape or not np.allclose(freqs, want_f, rtol=1e-4):
        raise ConvertError(
            f"{path}: rope_freqs is not Llama 3 RoPE scaling with low_freq_factor=1, "
            "high_freq_factor=4, original length 8192; allowed: those or no rope_freqs"
        )
    return (factor, *LLAMA3)


def llama3_factors(h: int, base: float, factor: float) -> np.ndarray:
    """llama.cpp's rope_freqs (H/2,) for Llama 3 RoPE scaling by `factor`."""
    low, high, old_len = LLAMA3
    inv_f = base ** (-np.arange(0, h, 2, dtype=np.float64) / h)
    wavelen_f = 2 * np.pi / inv_f
    smooth_f = np.clip((old_len / wavelen_f - low) / (high - low), 0.0, 1.0)
    return 1 / ((1 - smooth_f) / factor + smooth_f)


def fields(r: gguf.GGUFReader, path: Path) -> dict:
    """ModelConfig fields (plus 'arch') from the metadata and tensor shapes of a llama GGUF."""
    arch = _meta(r, path, "general.architecture")
    if arch != "llama":
        raise ConvertError(f"{path}: GGUF architecture {arch!r} is not supported; allowed: llama")
    m = lambda key, default=None: _meta(r, path, f"llama.{key}", default)  # noqa: E731
    tensors = {t.name: t for t in r.tensors}
    d, n_heads = int(m("embedding_length")), int(m("attention.head_count"))
    head_dim = int(m("attention.key_length", m("rope.dimension_count", d // n_heads)))
    base = _f32(m("rope.freq_base", 10_000.0))
    embed, freqs = tensors.get("token_embd.weight"), tensors.get("rope_freqs.weight")
    return dict(
        arch="llama",
        vocab_size=0 if embed is None else int(embed.shape[1]),  # GGML order: (in, rows)
        d_model=d,
        n_layers=int(m("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(m("attention.head_count_kv", n_heads)),
        d_ff=int(m("feed_forward_length")),
        d_head=0 if head_dim == d // n_heads else head_dim,
        rope_base=base,
        norm_eps=_f32(m("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors,
        qkv_bias=False,
        norm_plus_one=False,
        embed_scale=False,
        mlp_act="silu",
        rope_scaling=() if freqs is None else _rope_scaling(freqs, head_dim, base, path),
    )


def read(path: Path, with_tensors: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(fields plus 'arch', HF-named float32 tensors or {}) of a llama-architecture GGUF."""
    r = _reader(path)
    f, hf = fields(r, path), {}
    for t in r.tensors if with_tensors else ():
        stem, _, kind = t.name.rpartition(".")
        parts, w = stem.split("."), _dequantize(t, path)
        if stem in TOP_NAMES:
            hf[f"{TOP_NAMES[stem]}.{kind}"] = w
        elif len(parts) == 3 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
            if parts[2] in ("attn_q", "attn_k") and kind == "weight":
                w = unpermute(w, f["n_heads"] if parts[2] == "attn_q" else f["n_kv_heads"])
            hf[f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"] = w
        elif t.name != "rope_freqs.weight":  # rope_freqs is read into the fields
            hf[t.name] = w  # reported as unexpected, under its GGUF name
    return f, hf


GGUF_DTYPES = {
    "float32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "float16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}


def write(
    path: Path,
    hf: dict[str, np.ndarray],
    f: dict,
    max_len: int,
    dtype: str,
    tokenizer_from: Path,
    added_tokens: tuple[str, ...] = (),
) -> None:
    """A llama GGUF of HF-named tensors `hf` with (plain llama) fields `f`: matrices in
    `dtype` (float32 or float16), norms in float32 (as llama.cpp's converter writes them),
    the tokenizer metadata copied from the GGUF `tokenizer_from`, `added_tokens` (the rows
    past its vocabulary: mtp's thinking and pause tokens) appended."""
    if dtype not in GGUF_DTYPES:
        raise ConvertError(f"{path}: GGUF dtype {dtype!r}; allowed: {', '.join(GGUF_DTYPES)}")
    scaling = f["rope_scaling"]
    if scaling and tuple(scaling[1:]) != LLAMA3:
        raise ConvertError(
            f"{path}: RoPE scaling {scaling} cannot be written as GGUF; allowed: none, or "
            f"Llama 3's (factor, {', '.join(map(str, LLAMA3))})"
        )
    src = _reader(tokenizer_from)
    tok_rows = len(_meta(src, tokenizer_from, "tokenizer.ggml.tokens")) + len(added_tokens)
    if tok_rows != f["vocab_size"]:
        raise ConvertError(
            f"{path}: the tokenizer of {tokenizer_from} has {tok_rows} tokens with the "
            f"{len(added_tokens)} added, the model {f['vocab_size']} rows; allowed: equal sizes"
        )
    np_dtype, file_type = GGUF_DTYPES[dtype]
    head_dim = f["d_head"] or f["d_model"] // f["n_heads"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(f["n_layers"])
    w.add_context_length(max_len)
    w.add_embedding_length(f["d_model"])
    w.add_feed_forward_length(f["d_ff"])
    w.add_head_count(f["n_heads"])
    w.add_head_count_kv(f["n_kv_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(f["rope_base"])
    w.add_layer_norm_rms_eps(f["norm_eps"])
    w.add_file_type(file_type)
    if scaling:
        w.add_tensor(
            "rope_freqs.weight",
            llama3_factors(head_dim, f["rope_base"], scaling[0]).astype(np.float32),
        )
    added = {  # per-token arrays grow with the added tokens (control tokens, score 0)
        "tokenizer.ggml.tokens": list(added_tokens),
        "tokenizer.ggml.token_type": [int(gguf.TokenType.CONTROL)] * len(added_tokens),
        "tokenizer.ggml.scores": [0.0] * len(added_tokens),
    }
    for key, field in src.fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            value = field.contents() + added[key] if key in added else field.contents()
            w.add_key_value(key, value, field.types[0], sub)
    names = {v: k for k, v in TOP_NAMES.items()} | {v: k for k, v in LAYER_NAMES.items()}
    for name, x in hf.items():
        stem, _, kind = name.rpartition(".")
        parts = stem.split(".")
        if stem in names:
            out = names[stem]
        else:
            out = f"blk.{parts[2]}.{names['.'.join(parts[3:])]}"
            if out.endswith(("attn_q", "attn_k")):
                x = permute(x, f["n_heads"] if out.endswith("attn_q") else f["n_kv_heads"])
        w.add_tensor(
            f"{out}.{kind}", np.ascontiguousarray(x, np_dtype if x.ndim > 1 else np.float32)
        )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
