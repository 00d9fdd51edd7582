"""A pretrained model's tokenizer behind mtp's `Tokenizer` interface, over `tokenizers`.

    tok = load_tokenizer("hf:/models/smollm2")             # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer("gguf:/models/smollm2.gguf")      # the GGUF file's tokenizer metadata
    tok.specials.eos, tok.encode_with_specials("<think>"), tok.apply_chat(messages, True)

Specials: `eos` is the model's end token (`<|im_end|>` for ChatML instruct models),
`bos` its begin token, or for a vocabulary without one the end token again (a
document boundary, as GPT-2's `<|endoftext|>`). `pad` is the tokenizer's pad unless
that is the end token (pads are never targets, the end token is), else a new `<pad>`.
"<think>", "</think>" and "<pause>" are the vocabulary's own tokens where it has them;
else, with `specials='add'`, new special tokens, or with 'map', the existing tokens
`special_map` names ('think_open=<|reserved_0|>,...'; unnamed ones are still added).
New tokens take ids base..base+n-1 (base = the loaded vocabulary's size, in the order
pad, think_open, think_close, pause), so `vocab_size` = base + n.

A GGUF file with `tokenizer.ggml.model` 'gpt2' (byte-level BPE) is rebuilt as the
`tokenizers` BPE it was converted from: its tokens, merges and token types (control
tokens as special added tokens, user-defined ones as plain added tokens), and the
pre-tokenizer its `tokenizer.ggml.pre` names (the split regex llama.cpp uses for it).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable
from pathlib import Path

import gguf
import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from mtp.data.chat import render_chat
from mtp.data.specials import SPELLINGS, Specials, encode_with_spellings
from mtp.errors import ConvertError

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


# `tokenizer.ggml.pre` -> the pre-tokenizer of llama.cpp's split for it.
GGUF_PRE = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": _digits_then_gpt2,  # each digit alone, then GPT-2's regex
    "starcoder": _digits_then_gpt2,
    "llama-bpe": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "llama-v3": lambda: _split_then_bytes(_LLAMA3_SPLIT),
    "qwen2": lambda: _split_then_bytes(_QWEN2_SPLIT),
}
_CONTROL, _USER_DEFINED = _MARKED = (3, 4)  # GGUF token types matched whole in text
_NEW = ("think_open", "think_close", "pause")  # the specials mtp may add or map


class HFTokenizer:
    """mtp's `Tokenizer` over a `tokenizers.Tokenizer` (which it extends with the specials
    it lacks), with the model's chat template."""

    def __init__(
        self,
        tk: tokenizers.Tokenizer,
        *,
        eos: str,
        bos: str | None = None,
        pad: str | None = None,
        chat_template: str | None = None,
        specials: str = "add",
        special_map: str = "",
        where: str = "tokenizer",
    ):
        vocab = tk.get_vocab(with_added_tokens=True)
        base = max(vocab.values()) + 1

        def id_of(token: str, field: str) -> int:
            if token not in vocab:
                raise ConvertError(f"{where}: {field} {token!r} is not in the vocabulary")
            return vocab[token]

        mapped = dict(item.split("=", 1) for item in filter(None, special_map.split(",")))
        ids = {"eos": id_of(eos, "eos token"), "bos": id_of(bos or eos, "bos token")}
        want = {"pad": pad if pad and pad != eos else "<pad>"} | {n: SPELLINGS[n] for n in _NEW}
        added = []
        for name, token in want.items():
            if token in vocab and vocab[token] != ids["eos"]:
                ids[name] = vocab[token]
            elif specials == "map" and name in mapped:
                ids[name] = id_of(mapped[name], f"model.special_map {name}")
            else:
                added.append((name, token))
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in added])
        for i, (name, token) in enumerate(added):
            ids[name] = tk.token_to_id(token)
            if ids[name] != base + i:
                raise ConvertError(f"{where}: added token {token!r} got id {ids[name]}")
        self._tk = tk
        self._plain = tokenizers.Tokenizer.from_str(tk.to_str())
        self._plain.encode_special_tokens = True  # special spellings stay text
        self.base_vocab_size = base  # the pretrained vocabulary; added specials follow it
        self.vocab_size = base + len(added)
        self.specials = Specials(**ids)
        self.chat_template = chat_template
        self._tokens = {"bos_token": bos, "eos_token": eos, "pad_token": want["pad"]}
        self._spelled = {ids[n]: SPELLINGS[n] for n in _NEW}
        self._spelled[ids["pad"]] = ""
        self._by_spelling = {s: i for i, s in self._spelled.items() if s}
        self._spelling_re = re.compile("|".join(re.escape(s) for s in self._by_spelling))
        special = [i for i, t in tk.get_added_tokens_decoder().items() if t.special]
        self._special_ids = np.array(sorted(set(special) | set(ids.values())), np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._plain.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_with_specials(self, text: str) -> np.ndarray:
        return encode_with_spellings(text, self._spelling_re, self._by_spelling, self._ids_of)

    def _ids_of(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ids (n,). skip_special: drop every special (the model's own and mtp's),
        so bytes split by a pause rejoin; otherwise think and pause marks are spelled
        "<think>", "</think>", "<pause>" and the model's specials as their tokens. Pad and ids
        outside the vocabulary never render."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[(ids >= 0) & (ids < self.vocab_size)]
        if skip_special:
            return self._tk.decode(ids[~np.isin(ids, self._special_ids)].tolist())
        out, start = [], 0
        for i in np.flatnonzero(np.isin(ids, list(self._spelled))):
            out += [self._text(ids[start:i]), self._spelled[int(ids[i])]]
            start = i + 1
        out.append(self._text(ids[start:]))
        return "".join(out)

    def token(self, i: int) -> str:
        """The vocabulary entry of id i, as the tokenizer stores it ('<pad>', 'Ġthe')."""
        return self._tk.id_to_token(int(i))

    def _text(self, ids: np.ndarray) -> str:
        return self._tk.decode(ids.tolist(), skip_special_tokens=False) if ids.size else ""

    def apply_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt, **self._tokens)


def _token(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
    return value.get("content") if isinstance(value, dict) else value


def from_hf_dir(path: str | Path, specials: str = "add", special_map: str = "") -> HFTokenizer:
    """The tokenizer of a Hugging Face model directory."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        raise ConvertError(f"{path}: no tokenizer.json (only fast tokenizers are supported)")
    tk = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the config wins
        if (path / name).is_file():
            config |= json.loads((path / name).read_text())
    template = config.get("chat_template")
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    if isinstance(template, list):  # named templates: the default one
        template = {t["name"]: t["template"] for t in template}.get("default")
    eos = _token(config.get("eos_token"))
    if eos is None:
        raise ConvertError(f"{path}/tokenizer_config.json: no eos_token")
    return HFTokenizer(
        tk,
        eos=eos,
        bos=_token(config.get("bos_token")),
        pad=_token(config.get("pad_token")),
        chat_template=template,
        specials=specials,
        special_map=special_map,
        where=str(path),
    )


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def from_gguf(path: str | Path, specials: str = "add", special_map: str = "") -> HFTokenizer:
    """The tokenizer a GGUF file's metadata describes (byte-level BPE only)."""
    reader = gguf.GGUFReader(str(path))
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(
            f"{path}: tokenizer.ggml.model {kind!r} is not supported; allowed: 'gpt2' "
            "(byte-level BPE)"
        )
    pre = _field(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in GGUF_PRE:
        raise ConvertError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported; allowed: "
            + ", ".join(sorted(GGUF_PRE))
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tk = tokenizers.Tokenizer(bpe)
    tk.pre_tokenizer = GGUF_PRE[pre]()
    tk.decoder = decoders.ByteLevel()
    marked = {k: [t for t, k_ in zip(tokens, types, strict=True) if k_ == k] for k in _MARKED}
    tk.add_special_tokens([AddedToken(t, normalized=False) for t in marked[_CONTROL]])
    tk.add_tokens([AddedToken(t, normalized=False) for t in marked[_USER_DEFINED]])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    if token("eos") is None:
        raise ConvertError(f"{path}: no tokenizer.ggml.eos_token_id")
    return HFTokenizer(
        tk,
        eos=token("eos"),
        bos=token("bos"),
        pad=token("padding"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        specials=specials,
        special_map=special_map,
        where=str(path),
    )


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str, specials: str = "add", special_map: str = "") -> HFTokenizer:
    """The tokenizer of a local source 'hf:DIR' or 'gguf:FILE' (cached: loading is slow)."""
    kind, _, where = source.partition(":")
    if kind == "hf":
        return from_hf_dir(where, specials, special_map)
    if kind == "gguf":
        return from_gguf(where, specials, special_map)
    raise ConvertError(f"tokenizer source {source!r} is not 'hf:DIR' or 'gguf:FILE'")
