"""The compiled decoding loop does no per-pass work that a call can do once: a shared
drafter head's columns at the draft ids (D, U) are gathered before the loop, not in it."""

import re

import numpy as np
import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.model.system import MTPSystem

TOK = ByteTokenizer()
D, U = 32, 24  # distinct sizes, so the trimmed table's shape names it in the HLO


def _computations(hlo: str) -> dict[str, str]:
    """Each computation of an HLO module's text by name."""
    parts = re.split(r"\n(?=(?:ENTRY )?%?[\w.\-]+ (?:\([^\n]*\))? *-> [^\n]*\{\n)", hlo)
    out = {}
    for part in parts:
        head = re.match(r"(?:ENTRY )?%?([\w.\-]+)", part)
        if head:
            out[head.group(1)] = part
    return out


def _in_loops(hlo: str) -> str:
    """The text of every computation a `while` runs (its condition, its body and all they call)."""
    comps = _computations(hlo)
    refs = lambda text: re.findall(r"(?:body|condition|calls|to_apply|branch_computations)="
                                   r"\{?%?([\w.\-]+(?:, %?[\w.\-]+)*)", text)  # fmt: skip
    todo = re.findall(r"(?:body|condition)=%?([\w.\-]+)", hlo)
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name not in comps:
            continue
        seen.add(name)
        for group in refs(comps[name]):
            todo += [g.strip().lstrip("%") for g in group.split(",")]
    return "\n".join(comps[n] for n in seen)


@pytest.mark.parametrize("mode", ["speculative", "fast"])
def test_the_shared_heads_draft_columns_are_gathered_once_per_call(mode):
    main = ModelConfig(vocab_size=262, d_model=D, n_layers=1, n_heads=4, n_kv_heads=2, max_len=48)
    drafter = DrafterConfig(kind="transformer", k=3, n_heads=4, head="shared_frozen", draft_vocab=U)
    system = MTPSystem(main, drafter, pad_id=TOK.specials.pad, rngs=nnx.Rngs(0))
    dec = Decoder(system, TOK.specials)
    call = dec.prepare([np.arange(1, 6)], mode=mode, max_new_tokens=8, stop_id=-1)
    prefill, loop = dec.jits(call.slots)
    after = prefill(dec.state, *call.prefill_args, keep_taps=False)
    hlo = loop.lower(dec.state, *after, *call.loop_args, plan=call.plan).compile().as_text()
    # the table (D, U) or (U, D), made by a gather or by a fusion holding one
    made = rf"= f32\[(?:{U},{D}|{D},{U})(?:,1)?\]\S* (?:gather|fusion)\("
    assert re.findall(made, hlo), "the table is gathered somewhere (else this reads nothing)"
    in_loops = re.findall(made, _in_loops(hlo))
    assert "while(" in hlo and not in_loops, in_loops
