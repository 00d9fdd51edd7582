"""Pretrained checkpoints: the tiny HF fixtures (tests/fixtures/make_hf_fixtures.py) give
transformers' logits and greedy ids through mtp's full and cached forward; GGUF loads equal the
HF load; export then import is exact; every bad input is a one-line ConvertError."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import gguf
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from mtp.config import ModelConfig
from mtp.errors import ConvertError
from mtp.model import convert
from mtp.model.transformer import Transformer

HF = Path(__file__).resolve().parent / "fixtures" / "hf"
TOKENS = [1, 17, 250, 3, 99, 42, 42, 7, 200, 5, 64, 128]  # as make_hf_fixtures.TOKENS
PREFIX = 5


def _model(source, **over):
    cfg = ModelConfig(**convert.checkpoint_fields(source), max_len=32)
    model = Transformer(dataclasses.replace(cfg, **over), rngs=nnx.Rngs(0))
    convert.load_into(model, convert.read_weights(source), source=source)
    return model


@nnx.jit
def _forward(model, tokens_bt, positions_bt, cache):
    logits, _, cache = model(tokens_bt, positions_bt, cache)
    return logits, cache


def _feed(model, tokens, start, cache):
    pos = jnp.arange(start, start + len(tokens))[None]
    return _forward(model, jnp.array([tokens]), pos, cache)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_logits_cached_logits_and_greedy_ids_match_transformers(family):
    model = _model(f"hf:{HF / family}")
    ref = np.load(HF / family / "logits.npy")
    full, _, _ = nnx.jit(lambda m, t: m(t))(model, jnp.array([TOKENS]))
    np.testing.assert_allclose(full, ref, atol=1e-5, rtol=0)
    # prefill a prefix, then one token at a time, then greedy steps off the same cache
    logits, cache = _feed(model, TOKENS[:PREFIX], 0, model.init_cache(1))
    outs = [logits]
    for i in range(PREFIX, len(TOKENS)):
        logits, cache = _feed(model, [TOKENS[i]], i, cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, atol=1e-5, rtol=0)
    greedy = np.load(HF / family / "greedy.npy")
    ids = [int(jnp.argmax(logits[0, -1]))]
    for i in range(len(greedy) - 1):
        logits, cache = _feed(model, ids[-1:], len(TOKENS) + i, cache)
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert ids == greedy.tolist()


def test_checkpoint_fields_per_family():
    llama, qwen, gemma = (
        convert.checkpoint_fields(f"hf:{HF / n}") for n in ("llama", "qwen2", "gemma")
    )
    assert llama["rope_scaling"] == (4.0, 1.0, 4.0, 64.0) and not llama["tie_embeddings"]
    assert llama["rope_base"] == 500000.0 and llama["norm_eps"] == 1e-5
    assert qwen["qkv_bias"] and qwen["tie_embeddings"] and qwen["rope_base"] == 1e6
    assert gemma["d_head"] == 32 and gemma["n_kv_heads"] == 1 and gemma["mlp_act"] == "gelu_tanh"
    assert gemma["norm_plus_one"] and gemma["embed_scale"] and not llama["norm_plus_one"]
    assert {f["vocab_size"] for f in (llama, qwen, gemma)} == {272}


def test_mistral_and_older_configs_read_as_llama(tmp_path):
    shutil.copytree(HF / "llama", tmp_path / "m")
    c = json.loads((tmp_path / "m" / "config.json").read_text())
    rope = c.pop("rope_parameters")
    old = c | dict(architectures=["MistralForCausalLM"], sliding_window=None)
    old |= dict(rope_theta=rope.pop("rope_theta"), rope_scaling=rope)
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    f = convert.checkpoint_fields(f"hf:{tmp_path / 'm'}")
    assert f == convert.checkpoint_fields(f"hf:{HF / 'llama'}")
    (tmp_path / "m" / "config.json").write_text(json.dumps(old | dict(sliding_window=4096)))
    with pytest.raises(ConvertError, match="sliding_window=4096 is not supported"):
        convert.checkpoint_fields(f"hf:{tmp_path / 'm'}")


def _permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf order for Q/K rows."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
    )


def _llama3_factors(h, base, factor, low=1.0, high=4.0, old_len=8192):
    """llama.cpp's rope_freqs for Llama 3 scaling."""
    out = []
    for i in range(0, h, 2):
        wavelen = 2 * math.pi * base ** (i / h)
        smooth = (old_len / wavelen - low) / (high - low)
        out.append(1 if wavelen < old_len / high else factor if wavelen > old_len / low else
                   1 / ((1 - smooth) / factor + smooth))  # fmt: skip
    return np.array(out, np.float32)


def _write_gguf(path, tied, rope_freqs=None):
    f = convert.checkpoint_fields(f"hf:{HF / 'llama'}")
    t = load_file(HF / "llama" / "model-00001-of-00004.safetensors")
    for shard in (HF / "llama").glob("model-0000[2-9]*.safetensors"):
        t |= load_file(shard)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(f["n_layers"])
    w.add_embedding_length(f["d_model"])
    w.add_feed_forward_length(f["d_ff"])
    w.add_head_count(f["n_heads"])
    w.add_head_count_kv(f["n_kv_heads"])
    w.add_rope_freq_base(f["rope_base"])
    w.add_layer_norm_rms_eps(f["norm_eps"])
    w.add_context_length(128)
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    names |= {f"self_attn.{x}_proj": f"attn_{x}" for x in "qkv"} | {
        "self_attn.o_proj": "attn_output"
    }
    names |= {f"mlp.{x}_proj": f"ffn_{x}" for x in ("gate", "up", "down")}
    w.add_tensor("token_embd.weight", t["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", t["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", t["lm_head.weight"])
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for i in range(f["n_layers"]):
        for hf_name, g in names.items():
            x = t[f"model.layers.{i}.{hf_name}.weight"]
            if g in ("attn_q", "attn_k"):
                x = _permute(x, f["n_heads"] if g == "attn_q" else f["n_kv_heads"])
            if tied and g == "ffn_down":  # one half-precision tensor (dequantised on read)
                x = x.astype(np.float16)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return f"gguf:{path}"


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_equal_to_hf(tmp_path, tied):
    hf_src = f"hf:{HF / 'llama'}"
    factors = None if tied else _llama3_factors(16, 500000.0, 4.0)
    src = _write_gguf(tmp_path / "m.gguf", tied, factors)
    want = convert.checkpoint_fields(hf_src)
    want |= dict(tie_embeddings=tied, rope_scaling=() if tied else (4.0, 1.0, 4.0, 8192.0))
    assert convert.checkpoint_fields(src) == want
    got, ref = convert.read_weights(src), convert.read_weights(hf_src)
    if tied:
        del ref["head.kernel"]
    assert got.keys() == ref.keys()
    for k in ref:
        if tied and k.endswith("mlp.down.kernel"):
            ref[k] = ref[k].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def test_gguf_rope_freqs_other_than_llama3_is_refused(tmp_path):
    factors = _llama3_factors(16, 500000.0, 4.0, old_len=64)
    src = _write_gguf(tmp_path / "m.gguf", False, factors)
    with pytest.raises(ConvertError, match="rope_freqs"):
        convert.checkpoint_fields(src)


def _params(model):
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in flat}


@pytest.mark.parametrize(
    "family,arch,dtype",
    [("llama", "llama", "float32"), ("qwen2", "qwen2", "float32"), ("gemma", "gemma", "bfloat16")],
)
def test_export_then_import_is_exact(tmp_path, family, arch, dtype):
    src = f"hf:{HF / family}"
    model = _model(src, param_dtype=dtype)
    convert.export_hf(model, tmp_path / "out", arch=arch)
    back = f"hf:{tmp_path / 'out'}"
    assert convert.checkpoint_fields(back) == convert.checkpoint_fields(src)
    again = _model(back, param_dtype=dtype)
    mine, theirs = _params(model), _params(again)
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)


def _tokenizer_gguf(path, n):
    """A GGUF holding only a tokenizer of n tokens (what export_gguf copies)."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(n)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize(
    "dtype, scaling", [("float32", ()), ("float16", ()), ("float32", (8.0, 1.0, 4.0, 8192.0))]
)
def test_export_gguf_then_import_is_exact(tmp_path, dtype, scaling):
    """float32 files import exactly; float16 ones as the float16 rounding of every matrix.
    Llama 3 RoPE scaling travels as llama.cpp's rope_freqs tensor."""
    src = f"hf:{HF / 'llama'}"
    model = _model(src, rope_scaling=scaling)
    want = convert.checkpoint_fields(src) | dict(rope_scaling=scaling)
    tok = _tokenizer_gguf(tmp_path / "tok.gguf", want["vocab_size"] - 2)
    added = ("<think>", "</think>")  # rows past the tokenizer's vocabulary
    convert.export_gguf(model, tmp_path / "m.gguf", dtype, tokenizer_from=tok, added_tokens=added)
    back = f"gguf:{tmp_path / 'm.gguf'}"
    assert convert.checkpoint_fields(back) == want
    got, ref = convert.read_weights(back), convert.read_weights(src)
    assert got.keys() == ref.keys()
    for k in ref:
        if dtype == "float16" and ref[k].ndim > 1:
            assert got[k].dtype == np.float32 and not np.array_equal(got[k], ref[k]), k
            ref[k] = ref[k].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[-3:] == [f"t{want['vocab_size'] - 3}", *added]


def test_export_gguf_bad_input_is_one_line(tmp_path):
    model = _model(f"hf:{HF / 'llama'}", rope_scaling=())
    tok = _tokenizer_gguf(tmp_path / "tok.gguf", 7)
    with pytest.raises(ConvertError, match="has 7 tokens with the 0 added, the model 272 rows"):
        convert.export_gguf(model, tmp_path / "m.gguf", "float32", tokenizer_from=tok)
    with pytest.raises(ConvertError, match="allowed: float32, float16"):
        convert.export_gguf(model, tmp_path / "m.gguf", "bfloat16", tokenizer_from=tok)
    with pytest.raises(ConvertError, match="qkv_bias=True"):
        convert.export_gguf(_model(f"hf:{HF / 'qwen2'}"), tmp_path / "m.gguf", "float32", tok)
    with pytest.raises(ConvertError, match=r"RoPE scaling \(4.0, 1.0, 4.0, 64.0\) cannot"):
        convert.export_gguf(_model(f"hf:{HF / 'llama'}"), tmp_path / "m.gguf", "float32", tok)


def test_export_refuses_a_model_its_family_cannot_hold(tmp_path):
    model = _model(f"hf:{HF / 'qwen2'}")
    with pytest.raises(ConvertError, match="qkv_bias=True"):
        convert.export_hf(model, tmp_path / "out", arch="llama")


def test_bfloat16_params_load_and_run():
    model = _model(f"hf:{HF / 'llama'}", param_dtype="bfloat16", dtype="bfloat16")
    assert {v.dtype for v in _params(model).values()} == {jnp.dtype(jnp.bfloat16)}
    logits, _, _ = model(jnp.array([TOKENS]))
    ref = np.load(HF / "llama" / "logits.npy")
    assert np.isfinite(logits).all() and np.abs(logits - ref).max() < 0.05


def test_a_larger_vocab_gets_mean_rows_and_keeps_the_checkpoint_logits():
    src = f"hf:{HF / 'llama'}"
    model, w = _model(src, vocab_size=280), convert.read_weights(src)
    p = _params(model)
    np.testing.assert_array_equal(p["embed.embedding"][:272], w["embed.embedding"])
    np.testing.assert_allclose(p["embed.embedding"][272:], np.broadcast_to(
        w["embed.embedding"].mean(0), (8, 64)), rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(p["head.kernel"][:, 272:], np.broadcast_to(
        w["head.kernel"].mean(1, keepdims=True), (64, 8)), rtol=1e-6)  # fmt: skip
    logits, _, _ = model(jnp.array([TOKENS]))
    np.testing.assert_allclose(logits[..., :272], np.load(HF / "llama" / "logits.npy"), atol=1e-5)


def _broken_qwen(tmp_path, config=None, tensors=None):
    """A copy of the qwen2 fixture with config.json keys and tensors changed."""
    out = tmp_path / "qwen2"
    shutil.copytree(HF / "qwen2", out)
    c = json.loads((out / "config.json").read_text()) | (config or {})
    (out / "config.json").write_text(json.dumps(c))
    t = load_file(out / "model.safetensors")
    for name, value in (tensors or {}).items():
        if value is None:
            del t[name]
        else:
            t[name] = value(t) if callable(value) else value
    save_file(t, out / "model.safetensors")
    return f"hf:{out}"


K = "model.layers.1.self_attn.k_proj"
BAD = {
    "arch": (dict(architectures=["GPT2LMHeadModel"]), {}, "architecture 'GPT2LMHeadModel'.*"
             "allowed: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, GemmaForCausalLM"),
    "rope": (dict(rope_parameters=dict(rope_type="yarn", factor=2.0)), {}, "rope_type 'yarn'"),
    "window": (dict(use_sliding_window=True, sliding_window=64), {}, "sliding_window=64"),
    "missing": ({}, {K + ".bias": None}, f"missing tensor '{K}.bias'"),
    "extra": ({}, {"model.layers.1.extra.weight": np.ones(3, np.float32)}, "unexpected tensor"),
    "shape": ({}, {K + ".weight": lambda t: t[K + ".weight"][:-1]},
              rf"model.safetensors: tensor '{K}.weight' has shape \(31, 64\), expected \(32, 64\)"),
    "dtype": ({}, {K + ".bias": np.ones(32, np.int32)}, "dtype I32; allowed: F32, F16, BF16"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoints_raise_a_one_line_convert_error(tmp_path, case):
    config, tensors, message = BAD[case]
    src = _broken_qwen(tmp_path, config, tensors)
    with pytest.raises(ConvertError, match=message) as e:
        convert.read_weights(src)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_bf16_checkpoint_reads_as_its_float32_values(tmp_path):
    k = K + ".bias"
    src = _broken_qwen(tmp_path, tensors={k: lambda t: t[k].astype(ml_dtypes.bfloat16)})
    got = convert.read_weights(src)["blocks.1.attn.kv.bias"][:32]
    ref = load_file(HF / "qwen2" / "model.safetensors")[k]
    np.testing.assert_array_equal(got, ref.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize(
    "over,message",
    [
        (dict(vocab_size=200), "272 vocabulary rows but model.vocab_size is 200"),
        (dict(d_ff=96), r"'blocks.0.mlp.down.kernel' has shape \(64, 64\).*expects \(96, 64\)"),
        (dict(tie_embeddings=True), "unexpected tensor 'head.kernel'"),
    ],
)
def test_a_model_config_that_does_not_fit_the_checkpoint_is_refused(over, message):
    src = f"hf:{HF / 'llama'}"
    cfg = dataclasses.replace(ModelConfig(**convert.checkpoint_fields(src)), **over)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ConvertError, match=message) as e:
        convert.load_into(model, convert.read_weights(src), source=src)
    assert "\n" not in str(e.value)
