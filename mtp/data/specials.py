"""The six special tokens by name, and how they are spelled in text.

The specials delimit documents (`bos`, `eos`), pad rows (`pad`, never a
target), mark a thinking span (`think_open`, `think_close`: written literally
as "<think>" and "</think>" by tasks) and buy a pass of extra compute
(`pause`, written "<pause>", never a target). Every tokenizer
(`mtp.data.tokenizer`, `mtp.data.hf_tokenizer`) names its ids with `Specials`.
"""

from __future__ import annotations

import dataclasses

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


def encode_with_spellings(text: str, spelling_re, ids: dict, encode) -> np.ndarray:
    """(n,) int32: `text` with each match of `spelling_re` (a special's spelling) as its id
    in `ids` and the text between them through `encode` (text -> ids)."""
    parts, start = [], 0
    for m in spelling_re.finditer(text):
        parts += [encode(text[start : m.start()]), [ids[m.group()]]]
        start = m.end()
    parts.append(encode(text[start:]))
    return np.concatenate(parts).astype(np.int32)
