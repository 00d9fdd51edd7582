"""`decode_report` (mtp.run --mode=decode) and one-line errors for bad decoding input."""

import pytest
from flax import nnx

from mtp.config import DrafterConfig, ModelConfig, UserError
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.engine import Decoder
from mtp.decode.report import decode_report
from mtp.decode.sampling import Sampling
from mtp.model.system import MTPSystem

MAIN = ModelConfig(vocab_size=262, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=32)
TOK = ByteTokenizer()


def _system():
    return MTPSystem(MAIN, DrafterConfig(k=2, n_heads=4), pad_id=TOK.specials.pad, rngs=nnx.Rngs(0))


def test_think_budget_row_thinks_within_the_budget_then_answers():
    """--think_budget: the think row is think_then_answer's thought (forced close at the budget)
    and answer; with budget 1 on an untrained model the close is forced after one fast pass."""
    out = decode_report(_system(), TOK, "ab", ["think"], max_new_tokens=4, think_budget=1)
    head = next(line for line in out.splitlines() if line.startswith("### think"))
    k = 2  # the drafter's k in _system: one fast pass writes k + 1 tokens
    assert f"budget 1 passes: {k + 1} thought tokens, forced </think>" in head


def test_decode_report_prints_every_mode_and_a_table():
    modes = ["slow", "speculative", "fast", "think", "adaptive"]
    out = decode_report(_system(), TOK, "ab<think>c", modes, max_new_tokens=8, tau=0.5)
    for mode in ("slow", "speculative", "fast", "think", "adaptive"):
        assert f"### {mode}\nab<think>c" in out
        assert f"| {mode} | " in out
    assert "passes by tokens per pass (prob >= 0.5): {" in out
    assert "| mode | tokens | main passes | tokens/pass |" in out
    assert "speculative greedy identical to slow: yes" in out


def test_tree_nodes_make_the_speculative_row_a_tree():
    out = decode_report(_system(), TOK, "ab", ["slow", "speculative"], max_new_tokens=8,
                        tree_nodes=3, tree_beams=2)  # fmt: skip
    assert "### speculative (a tree of 3 nodes, 2 beams)\nab" in out
    assert "speculative greedy identical to slow: yes" in out


BAD_REPORT = {
    "empty prompt": (dict(prompt=""), "--prompt is empty"),
    "unknown mode": (dict(modes=["slow", "warp"]), "'warp' is unknown; allowed: slow, fast"),
    "no mode": (dict(modes=[]), "no decode mode given; allowed"),
    "prompt longer than the cache": (dict(prompt="x" * 40), "the cache holds max_len=32"),
    "no room for the output": (dict(prompt="x" * 20, max_new_tokens=20), "max_new_tokens <= 11"),
    "bad temperature": (dict(temperature=-1.0), "temperature: must be >= 0"),
}


@pytest.mark.parametrize("case", BAD_REPORT)
def test_bad_report_input_is_a_one_line_user_error(case):
    kw, msg = BAD_REPORT[case]
    args = dict(prompt="ab", modes=["slow"], max_new_tokens=4, temperature=0.0) | kw
    with pytest.raises(UserError) as e:
        decode_report(_system(), TOK, **args)
    assert msg in str(e.value) and "\n" not in str(e.value)


ROW = [TOK.specials.bos, 1]
BAD_ENGINE = {
    "k other than the checkpoint's": (
        lambda generate: generate([ROW], k=3),
        "k=3 but this checkpoint's drafter drafts k=2",
    ),
    "no prompts": (lambda generate: generate([]), "no prompts"),
    "empty prompt row": (lambda generate: generate([ROW, []]), "prompt 1 is empty"),
    "token outside the vocabulary": (lambda generate: generate([[300]]), "outside 0..261"),
    "max_new_tokens 0": (
        lambda generate: generate([ROW], max_new_tokens=0),
        "max_new_tokens must be an integer >= 1",
    ),
    "unknown mode": (
        lambda generate: generate([ROW], mode="turbo"),
        "allowed: slow, fast, adaptive, speculative, think, pause",
    ),
    "bad top_p": (
        lambda generate: generate([ROW], sampling=Sampling(temperature=1.0, top_p=0.0)),
        "top_p: must be in (0, 1]",
    ),
}


@pytest.mark.parametrize("case", BAD_ENGINE)
def test_bad_engine_input_is_a_one_line_user_error(case):
    call, msg = BAD_ENGINE[case]
    dec = Decoder(_system(), TOK.specials)
    with pytest.raises(UserError) as e:
        call(lambda prompts, **kw: dec.generate(prompts, **{"max_new_tokens": 4, **kw}))
    assert msg in str(e.value) and "\n" not in str(e.value)
