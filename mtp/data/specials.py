"""The six special tokens by name, and how they are spelled in text.

The specials delimit documents (`bos`, `eos`), pad rows (`pad`, never a
target), mark a thinking span (`think_open`, `think_close`: written literally
as "<think>" and "</think>" by tasks) and buy a pass of extra compute
(`pause`, written "<pause>", never a target). Every tokenizer
(`mtp.data.tokenizer`, `mtp.data.hf_tokenizer`) names its ids with `Specials`.
"""

from __future__ import annotations

import dataclasses

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
