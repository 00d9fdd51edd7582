"""The `rl` config section and the 'task:' corpus used for the warm-up."""

import dataclasses

import numpy as np
import pytest

from mtp.config import ConfigError, DataConfig, PauseConfig, RLConfig, default_config, resolve
from mtp.data.pipeline import eval_batches, packed_rows
from mtp.data.task_data import check_tasks, parse_task_spec
from mtp.data.tokenizer import ByteTokenizer
from mtp.errors import DataError

S = ByteTokenizer.specials


def test_task_corpus_is_one_example_per_row_padded():
    cfg = DataConfig(corpus="task:addition:digits=3,n=50", seq_len=64, batch_size=4)
    rows, mask = packed_rows(cfg, ByteTokenizer(), "train")
    assert rows.shape == mask.shape == (50, 64)
    assert (mask == (rows != S.pad)).all()  # pads are never targets
    for row in rows[:5]:
        n = int(np.argmax(row == S.eos)) + 1
        assert row[0] == S.bos and (row[n:] == S.pad).all()
        assert (row == S.think_open).sum() == 1 and (row == S.think_close).sum() == 1
    batch = eval_batches(cfg, ByteTokenizer(), 2)[0]
    assert (batch["loss_mask"] == (batch["tokens"] != S.pad)).all()


@pytest.mark.parametrize(
    "corpus, message",
    [
        ("task:addition:digits=9,n=5", "more than data.seq_len=64"),
        ("task:sorting", "unknown task 'sorting'"),
        ("task:addition:width=3", "unknown parameter 'width'"),
        ("task:addition:digits=x", "expected key=integer"),
    ],
)
def test_bad_task_corpus_names_the_problem(corpus, message):
    cfg = DataConfig(corpus=corpus, seq_len=64)
    with pytest.raises((DataError, ConfigError), match=message):
        packed_rows(cfg, ByteTokenizer(), "train")


def _config(**rl):
    c = default_config()
    c.program = "rl"
    c.rl = dataclasses.asdict(RLConfig())
    c.rl.update(rl)
    return c


def _checked(c):
    """What `mtp.programs.run_program` checks before it runs anything."""
    run = resolve(c)
    check_tasks(run)
    return run


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("trainable", ("both", "all"), "config.rl.trainable: 'all' not in"),
        ("group_size", 1, "config.rl.group_size: must be >= 2"),
        ("advantage", "ppo", "config.rl.advantage: 'ppo' not in"),
        ("temperature", 0.0, "config.rl.temperature: must be > 0"),
        ("on_bad_reward", "ignore", "config.rl.on_bad_reward: 'ignore' not in"),
        ("reward", "digits", "config.rl.reward: 'digits' not in"),
        ("task", "addition:digits=99", "config.rl.task: task 'addition': digits must be in"),
        ("replay", 1.5, "config.rl.replay: must be in"),
        ("oversample", 0, "config.rl.oversample: must be >= 1"),
        ("distill", -0.1, "config.rl.distill: must be >= 0"),
        ("rollout", "pause", "config.rl.rollout: program 'rl' runs 'think' rollouts"),
    ],
)
def test_rl_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        _checked(_config(**{field: value}))


def test_rl_section_is_optional_and_round_trips():
    assert resolve(default_config()).rl is None
    with pytest.raises(ConfigError, match="config.rl: program 'rl' needs a 'rl' section"):
        resolve(default_config().to_dict() | {"program": "rl"})
    with pytest.raises(ConfigError, match="config.rl: program 'train' takes no 'rl' section"):
        resolve(_config().to_dict() | {"program": "train"})
    run = _checked(_config(trainable=["drafter", "both"]))
    assert run.rl.trainable == ("drafter", "both")  # lists (from JSON) become tuples
    assert resolve(run.to_dict()) == run
    task, n = parse_task_spec("multiplication:digits=3,n=7")
    assert task.name == "multiplication" and n == 7


def test_pause_cap_that_overflows_the_cache_names_model_max_len():
    c = default_config()
    c.program = "pause"
    c.model.update(use_urgency=True, max_len=64)
    c.data.update(seq_len=32)
    task = "multiplication:digits=3,thought=0"
    c.pause = dataclasses.asdict(PauseConfig(task=task, cap=48))
    c.rl = dataclasses.asdict(RLConfig(task=task, rollout="pause"))
    _checked(c)  # 10 prompt tokens, up to 48 pauses, 5 answer tokens + <eos>: 64
    c.pause["cap"] = 49
    run = resolve(c)  # the section alone is valid; the need comes from the task's prompts
    with pytest.raises(ConfigError, match=r"config.model.max_len: must be >= 65 .*pause.cap=49"):
        check_tasks(run)


def test_a_bad_teacher_forced_task_names_its_field():
    c = default_config()
    c.data.update(corpus="distill:rg_chain_sum:n=4", cache_taps=True, teacher_forced="rg_x:n=4")
    with pytest.raises(ConfigError, match=r"^config.data.teacher_forced: .*rg_x") as e:
        _checked(c)
    assert "\n" not in str(e.value)
