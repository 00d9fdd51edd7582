"""The tokenizer interface, and the byte-level tokenizer that implements it.

Every module that needs a token id asks the tokenizer for it by name
(`tok.specials.eos`): no module holds ids as constants, so any tokenizer with
the six named specials (`mtp.data.specials`) can stand behind the data, the
decoder and RL. A pretrained model's tokenizer (`mtp.data.hf_tokenizer`) also
brings its chat template; the byte tokenizer has none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from mtp.config.sources import local_source
from mtp.data.hf_tokenizer import load_tokenizer
from mtp.data.specials import SPELLINGS, Specials, encode_with_spellings


class Tokenizer(Protocol):
    """What mtp needs of a tokenizer."""

    vocab_size: int
    specials: Specials
    chat_template: str | None  # an instruct model's Jinja chat template; None: no chat layout

    def encode(self, text: str) -> np.ndarray:
        """(n,) int32 ids of plain text; special spellings in it stay plain text."""

    def encode_with_specials(self, text: str) -> np.ndarray:
        """(n,) int32 ids with each special spelling ("<think>", ...) as its special id."""

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ids; with `skip_special` the specials are dropped, else spelled out."""

    def apply_chat(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = False
    ) -> str:
        """The chat template rendered over `messages` ({'role', 'content'} dicts), as text."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the six specials as ids 256..261."""

    vocab_size = 262
    specials = Specials(pad=256, bos=257, eos=258, think_open=259, think_close=260, pause=261)
    chat_template = None

    def __init__(self):
        self._spelling = {getattr(self.specials, n): s for n, s in SPELLINGS.items()}
        self._ids = {s: i for i, s in self._spelling.items()}
        self._special_re = re.compile("|".join(re.escape(s) for s in self._ids))

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def encode_with_specials(self, text: str) -> np.ndarray:
        return encode_with_spellings(text, self._special_re, self._ids, self.encode)

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ids (n,); invalid UTF-8 becomes U+FFFD.

        skip_special: drop every id >= 256, so bytes split by a pause rejoin;
        otherwise specials render as their spellings. Pad and ids past the
        vocabulary (a model's rounded-up vocab) or below 0 never render.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        if skip_special:
            return _bytes_text(ids[(ids >= 0) & (ids < 256)])
        out, start = [], 0
        for i in np.flatnonzero((ids < 0) | (ids >= 256)):
            out += [_bytes_text(ids[start:i]), self._spelling.get(int(ids[i]), "")]
            start = i + 1
        out.append(_bytes_text(ids[start:]))
        return "".join(out)

    def apply_chat(self, messages, add_generation_prompt=False) -> str:
        raise ValueError("the byte tokenizer has no chat template (chat_template is None)")


def _bytes_text(byte_ids: np.ndarray) -> str:
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def tokenizer_of(run) -> Tokenizer:
    """The tokenizer a run's models read and write: the byte tokenizer for a model mtp trains
    from scratch (`model.init_from` = ''), else the pretrained source's own tokenizer, with
    the specials it lacks added or mapped as `model.specials` / `model.special_map` say."""
    m = run.model
    if not m.init_from:
        return ByteTokenizer()
    return load_tokenizer(local_source(m.init_from), m.specials, m.special_map)
