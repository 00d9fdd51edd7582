"""reasoning-gym tasks: seeded examples, reasoning-gym's verifier, the prompt-hash split, the
max_len bound, and one pass through the task-data path."""

from pathlib import Path

import numpy as np
import pytest

from mtp.config import ConfigError, DataConfig
from mtp.data.format import encode_example, frame_len, render
from mtp.data.hf_tokenizer import from_hf_dir
from mtp.data.task_data import task_rows
from mtp.data.tasks import TASKS, make_task, split_of
from mtp.data.tokenizer import ByteTokenizer

NAMES = ["rg_basic_arithmetic", "rg_chain_sum", "rg_gsm_symbolic"]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokenizer"


@pytest.mark.parametrize("name", NAMES)
def test_examples_are_deterministic_by_seed(name):
    assert name in TASKS
    a, b = make_task(name).example(7), make_task(name).example(7)
    assert a == b and a.prompt and a.answer
    assert len({make_task(name).example(s).prompt for s in range(8)}) == 8


@pytest.mark.parametrize("name", NAMES)
def test_score_is_reasoning_gyms_verifier(name):
    task = make_task(name)
    for ex in task.examples("train", 20):
        assert task.score(ex.prompt, ex.answer) == 1.0
        assert task.solve(ex.prompt) == ex.answer
        wrong = ex.answer + "7"
        assert task.score(ex.prompt, wrong) == 0.0
        assert task.score(ex.prompt, "") == 0.0
        assert task.score(ex.prompt, "no idea") == 0.0
        assert 0.0 <= task.partial_score(ex.prompt, wrong) < 1.0
    with pytest.raises(ValueError, match="not drawn"):
        task.score("What is 1+1?", "2")


def test_thoughts():
    ex = make_task("rg_chain_sum").example(3)
    steps = ex.thought.split()
    assert steps and steps[-1].rpartition("=")[2] == ex.answer
    for step in steps:  # each step's sum is right
        lhs, _, total = step.rpartition("=")
        assert eval(lhs.replace("--", "+")) == int(total)  # noqa: S307 - digits and +/- only
    gsm = make_task("rg_gsm_symbolic").example(3)
    assert gsm.thought and "####" not in gsm.thought and ex.answer not in ("", None)
    assert make_task("rg_basic_arithmetic").example(3).thought == ""


@pytest.mark.parametrize("name", NAMES)
def test_split_by_prompt_hash(name):
    task = make_task(name)
    train, test = task.examples("train", 60), task.examples("eval", 15)
    assert all(split_of(e.prompt) == "train" for e in train)
    assert all(split_of(e.prompt) == "eval" for e in test)
    assert not {e.prompt for e in train} & {e.prompt for e in test}


@pytest.mark.parametrize("name", NAMES)
def test_rendered_examples_fit_max_len(name):
    task = make_task(name)
    byte, hf = ByteTokenizer(), from_hf_dir(FIXTURE)
    for ex in task.examples("train", 150):
        assert len(render(ex).encode()) <= task.max_len
        assert len(ex.answer) <= task.max_answer_len
        for tok in (byte, hf):
            assert encode_example(tok, ex).size <= task.max_len + frame_len(tok)


def test_difficulty_is_checked():
    task = make_task("rg_chain_sum", min_terms=3, max_terms=3, max_digits=2)
    for ex in task.examples("train", 10):
        assert ex.prompt.count("+") + ex.prompt.count("-") == 2
    with pytest.raises(ConfigError, match="max_terms"):
        make_task("rg_basic_arithmetic", min_terms=4, max_terms=3)
    with pytest.raises(ConfigError, match="unknown parameter"):
        make_task("rg_gsm_symbolic", digits=3)


def test_task_data_rows():
    tok = ByteTokenizer()
    task = make_task("rg_chain_sum")
    cfg = DataConfig(corpus="task:rg_chain_sum:n=8", seq_len=task.max_len + 2)
    rows, mask = task_rows(cfg, tok, "train")
    assert rows.shape == (8, cfg.seq_len) and mask.shape == rows.shape
    for row, ex in zip(rows, task.examples("train", 8), strict=True):
        ids = encode_example(tok, ex)
        assert row[: ids.size].tolist() == ids.tolist()
        assert np.all(row[ids.size :] == tok.specials.pad)
