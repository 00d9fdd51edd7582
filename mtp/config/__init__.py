"""Config defaults and validation; one module per section, re-exported here.

Experiments are `ml_collections.ConfigDict`s (see `experiments/`); modules never
read them. At the edge, each section is converted once into a small frozen
dataclass whose `__post_init__` validates it, so a wrong value fails before
anything compiles, with a `ConfigError` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mtp.config.fields import ConfigError, UserError, check
from mtp.config.model import DrafterConfig, ModelConfig, drafter_config, model_config
from mtp.config.pause import PauseConfig, pause_config
from mtp.config.rl import RLConfig, rl_config
from mtp.config.sweep import SweepConfig, sweep_config
from mtp.config.training import DataConfig, TrainConfig, data_config, train_config

__all__ = [
    "ConfigError", "Configs", "DataConfig", "DrafterConfig", "ModelConfig", "PauseConfig",
    "RLConfig", "SweepConfig", "TrainConfig", "UserError", "default_config", "validate",
]  # fmt: skip


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default; experiments override a few. Locked: typos fail."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dataclasses.asdict(ModelConfig())
    c.drafter = dataclasses.asdict(DrafterConfig())
    c.data = dataclasses.asdict(DataConfig())
    c.train = dataclasses.asdict(TrainConfig())
    return c


@dataclasses.dataclass(frozen=True)
class Configs:
    """All sections of a config, validated together."""

    model: ModelConfig
    drafter: DrafterConfig
    data: DataConfig
    train: TrainConfig
    seed: int
    rl: RLConfig | None = None
    sweep: SweepConfig | None = None
    pause: PauseConfig | None = None


def validate(config, min_vocab: int = 262) -> Configs:
    """Validates every section and the checks that span sections; raises ConfigError."""
    known = {"seed", "model", "drafter", "data", "train", "rl", "pause", "decode", "sweep"}
    for key in config.keys():
        check(key in known, key, f"unknown section; allowed: {', '.join(sorted(known))}")
    cs = Configs(
        model=model_config(config),
        drafter=drafter_config(config),
        data=data_config(config),
        train=train_config(config),
        seed=int(config.seed),
        rl=rl_config(config),
        sweep=sweep_config(config),
        pause=pause_config(config),
    )
    check(
        cs.data.seq_len <= cs.model.max_len,
        "data.seq_len",
        f"{cs.data.seq_len} is above the model's maximum (model.max_len={cs.model.max_len})",
    )
    check(
        cs.model.vocab_size >= min_vocab,
        "model.vocab_size",
        f"must be >= {min_vocab} (the tokenizer's vocabulary), got {cs.model.vocab_size}",
    )
    if cs.pause is not None:
        check(cs.rl is None and cs.sweep is None, "pause", "cannot be combined with rl or sweep")
        check(cs.model.use_urgency, "model.use_urgency", "must be True with a pause section")
        from mtp.data.task_data import parse_task_spec  # tasks import this module
        from mtp.data.tasks.base import MARKS_LEN

        task, _ = parse_task_spec(cs.pause.task)
        answer = task.max_answer_len + 1  # + <eos>
        # <bos> prompt <think> thought </think>: the marks are one token each
        head = 1 + task.max_len - MARKS_LEN - task.max_answer_len + 2
        need = head + max(max(cs.pause.eval_ms, default=0), cs.pause.cap) + answer
        check(
            cs.model.max_len >= need,
            "model.max_len",
            f"must be >= {need} for pause.task's prompts with max(pause.eval_ms) pauses or "
            f"pause.cap={cs.pause.cap} pauses before the answer, got {cs.model.max_len}",
        )
    if cs.sweep is not None:
        check(cs.rl is None, "sweep", "a sweep of RL runs is not supported; drop the rl section")
        sp = cs.sweep
        check(
            sp.prompt_len <= cs.data.seq_len,
            "sweep.prompt_len",
            f"{sp.prompt_len} is above data.seq_len={cs.data.seq_len} (prompts are held-out rows)",
        )
        check(
            sp.prompt_len + sp.new_tokens <= cs.model.max_len,
            "sweep.new_tokens",
            f"prompt_len + new_tokens = {sp.prompt_len + sp.new_tokens} is above the model's "
            f"cache (model.max_len={cs.model.max_len})",
        )
    return cs
