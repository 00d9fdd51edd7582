"""The tokenizer interface, and the byte-level tokenizer that implements it.

Every module that needs a token id asks the tokenizer for it by name
(`tok.specials.eos`): no module holds ids as constants, so any tokenizer with
the six named specials can stand behind the data, the decoder and RL.

The specials delimit documents (`bos`, `eos`), pad rows (`pad`, never a
target), mark a thinking span (`think_open`, `think_close`: written literally
as "<think>" and "</think>" by tasks) and buy a pass of extra compute
(`pause`, written "<pause>", never a target).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import Protocol

import numpy as np

SPECIAL_NAMES = ("pad", "bos", "eos", "think_open", "think_close", "pause")


@dataclasses.dataclass(frozen=True)
class Specials:
    """The special token ids of one tokenizer, by name. Hashable: decoders compile on it."""

    pad: int
    bos: int
    eos: int
    think_open: int
    think_close: int
    pause: int


# How specials are written in text; pad has no spelling and never renders.
SPELLINGS = {
    "bos": "<bos>",
    "eos": "<eos>",
    "think_open": "<think>",
    "think_close": "</think>",
    "pause": "<pause>",
}


class Tokenizer(Protocol):
    """What mtp needs of a tokenizer."""

    vocab_size: int
    specials: Specials

    def encode(self, text: str) -> np.ndarray:
        """(n,) int32 ids of plain text; special spellings in it stay plain text."""

    def encode_with_specials(self, text: str) -> np.ndarray:
        """(n,) int32 ids with each special spelling ("<think>", ...) as its special id."""

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ids; with `skip_special` the specials are dropped, else spelled out."""


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then the six specials as ids 256..261."""

    vocab_size = 262
    specials = Specials(pad=256, bos=257, eos=258, think_open=259, think_close=260, pause=261)

    def __init__(self):
        self._spelling = {getattr(self.specials, n): s for n, s in SPELLINGS.items()}
        self._ids = {s: i for i, s in self._spelling.items()}
        self._special_re = re.compile("|".join(re.escape(s) for s in self._ids))

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def encode_with_specials(self, text: str) -> np.ndarray:
        parts, start = [], 0
        for m in self._special_re.finditer(text):
            parts += [self.encode(text[start : m.start()]), [self._ids[m.group()]]]
            start = m.end()
        parts.append(self.encode(text[start:]))
        return np.concatenate(parts).astype(np.int32)

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


def _bytes_text(byte_ids: np.ndarray) -> str:
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def tokenizer_of(run) -> Tokenizer:
    """The tokenizer a run's models read and write: the byte tokenizer for every model mtp
    trains from scratch."""
    del run
    return ByteTokenizer()
