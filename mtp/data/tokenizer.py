"""Byte-level tokenizer: ids 0..255 are the UTF-8 bytes, then six special tokens.

Byte tokens need no training and cover any text. The specials delimit
documents (BOS, EOS), pad rows (PAD, never a target), mark a thinking span
(`<think>`, `</think>`, written literally by tasks) and buy a pass of extra
compute (`<pause>`, never a target).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

PAD_ID = 256
BOS_ID = 257
EOS_ID = 258
THINK_OPEN_ID = 259
THINK_CLOSE_ID = 260
PAUSE_ID = 261
VOCAB_SIZE = 262

# How specials are written in text; PAD has no spelling and never renders.
SPECIAL_STRINGS = {
    BOS_ID: "<bos>",
    EOS_ID: "<eos>",
    THINK_OPEN_ID: "<think>",
    THINK_CLOSE_ID: "</think>",
    PAUSE_ID: "<pause>",
}
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_STRINGS.values()))
_SPECIAL_IDS = {s: i for i, s in SPECIAL_STRINGS.items()}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255; specials as the module constants above."""

    vocab_size = VOCAB_SIZE
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    think_open_id = THINK_OPEN_ID
    think_close_id = THINK_CLOSE_ID
    pause_id = PAUSE_ID

    def encode(self, text: str | bytes) -> np.ndarray:
        """(n,) int32 byte ids; special strings in `text` stay plain bytes."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, np.uint8).astype(np.int32)

    def encode_with_specials(self, text: str) -> np.ndarray:
        """(n,) int32 ids with each literal special string ("<think>", ...) as its id."""
        parts, start = [], 0
        for m in _SPECIAL_RE.finditer(text):
            parts += [self.encode(text[start : m.start()]), [_SPECIAL_IDS[m.group()]]]
            start = m.end()
        parts.append(self.encode(text[start:]))
        return np.concatenate(parts).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray, skip_special: bool = True) -> str:
        """Text of ids (n,); invalid UTF-8 becomes U+FFFD.

        skip_special: drop every id >= 256, so bytes split by a pause rejoin;
        otherwise specials render as their strings. PAD and ids past the
        vocabulary (a model's rounded-up vocab) or below 0 never render.
        """
        ids = np.asarray(ids, np.int64).reshape(-1)
        if skip_special:
            return _bytes_text(ids[(ids >= 0) & (ids < 256)])
        out, start = [], 0
        for i in np.flatnonzero((ids < 0) | (ids >= 256)):
            out += [_bytes_text(ids[start:i]), SPECIAL_STRINGS.get(int(ids[i]), "")]
            start = i + 1
        out.append(_bytes_text(ids[start:]))
        return "".join(out)


def _bytes_text(byte_ids: np.ndarray) -> str:
    return byte_ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")
