"""Config defaults, and `resolve`: a ConfigDict becomes a typed `Run`, once, at the edge.

Experiments are `ml_collections.ConfigDict`s (see `experiments/`). `resolve`
converts every section into a small frozen dataclass whose `__post_init__`
validates it, checks what spans sections, and names the `program` to run:
a wrong value fails before anything compiles, with a `ConfigError` naming the
field and what is allowed. Library code takes the `Run` or its sections,
never the dict; the run directory stores `Run.to_dict()`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mtp.config.fields import check
from mtp.config.model import DrafterConfig, ModelConfig, drafter_config, model_config
from mtp.config.pause import PauseConfig, pause_config
from mtp.config.rl import RLConfig, rl_config
from mtp.config.sweep import SweepConfig, sweep_config
from mtp.config.training import DataConfig, TrainConfig, data_config, train_config
from mtp.errors import ConfigError, UserError

__all__ = [
    "PROGRAMS", "ConfigError", "DataConfig", "DrafterConfig", "ModelConfig", "PauseConfig",
    "RLConfig", "Run", "SweepConfig", "TrainConfig", "UserError", "default_config", "resolve",
]  # fmt: skip

# What a config runs, and the optional sections each program needs.
PROGRAMS = {"train": (), "rl": ("rl",), "pause": ("pause", "rl"), "sweep": ("sweep",)}
OPTIONAL = ("rl", "pause", "sweep")


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default; experiments override a few. Locked: typos fail."""
    c = ml_collections.ConfigDict()
    c.program = "train"
    c.seed = 0
    c.model = dataclasses.asdict(ModelConfig())
    c.drafter = dataclasses.asdict(DrafterConfig())
    c.data = dataclasses.asdict(DataConfig())
    c.train = dataclasses.asdict(TrainConfig())
    return c


@dataclasses.dataclass(frozen=True)
class Run:
    """A resolved config: the program to run and every section, validated together."""

    program: str
    seed: int
    model: ModelConfig
    drafter: DrafterConfig
    data: DataConfig
    train: TrainConfig
    rl: RLConfig | None = None
    sweep: SweepConfig | None = None
    pause: PauseConfig | None = None

    def to_dict(self) -> dict:
        """JSON-able: what the run directory stores and `resolve` reads back."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def replace(self, **changes) -> Run:
        """This run with some sections (or fields) replaced, checked again."""
        return _checked(dataclasses.replace(self, **changes))


def resolve(config, min_vocab: int = 262) -> Run:
    """Validates every section of `config` (a ConfigDict or a dict) and the checks that span
    sections; raises ConfigError naming the field."""
    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    known = {"program", "seed", "model", "drafter", "data", "train", *OPTIONAL}
    for key in config.keys():
        check(key in known, key, f"unknown section; allowed: {', '.join(sorted(known))}")
    program = config.get("program", None)
    check(
        program in PROGRAMS,
        "program",
        f"{program!r} is not a program; allowed: {', '.join(PROGRAMS)} "
        "(set c.program in the experiment's get_config)",
    )
    run = Run(
        program=program,
        seed=int(config.seed),
        model=model_config(config),
        drafter=drafter_config(config),
        data=data_config(config),
        train=train_config(config),
        rl=rl_config(config),
        sweep=sweep_config(config),
        pause=pause_config(config),
    )
    return _checked(run, min_vocab)


def _checked(run: Run, min_vocab: int = 262) -> Run:
    needs = PROGRAMS[run.program]
    for name in OPTIONAL:
        present = getattr(run, name) is not None
        check(
            present == (name in needs),
            name,
            f"program {run.program!r} {'needs a' if name in needs else 'takes no'} {name!r} "
            f"section (programs and their sections: "
            + ", ".join(f"{p}: {'+'.join(s) or 'none'}" for p, s in PROGRAMS.items())
            + ")",
        )
    check(
        run.data.seq_len <= run.model.max_len,
        "data.seq_len",
        f"{run.data.seq_len} is above the model's maximum (model.max_len={run.model.max_len})",
    )
    check(
        run.model.vocab_size >= min_vocab,
        "model.vocab_size",
        f"must be >= {min_vocab} (the tokenizer's vocabulary), got {run.model.vocab_size}",
    )
    d = run.drafter.d_model or run.model.d_model
    check(
        d % run.drafter.n_heads == 0,
        "drafter.n_heads",
        f"must divide drafter width {d}, got {run.drafter.n_heads}",
    )
    check(
        not (run.data.pack_windows and run.drafter.context),
        "data.pack_windows",
        "cannot pack for drafter.context=True (each window brings its own past taps)",
    )
    if run.program == "rl":
        check(run.rl.rollout == "think", "rl.rollout", "program 'rl' runs 'think' rollouts")
        if run.rl.thought_mode == "learned":
            check(run.drafter.emission, "rl.thought_mode",
                  "'learned' needs a keep head: set drafter.emission=True")  # fmt: skip
    if run.program == "pause":
        check(run.model.use_urgency, "model.use_urgency", "must be True for program 'pause'")
        check(run.rl.rollout == "pause", "rl.rollout", "program 'pause' runs 'pause' rollouts")
        check(run.rl.task == run.pause.task, "rl.task", "must equal pause.task")
    if run.program == "sweep":
        sp = run.sweep
        check(
            sp.prompt_len <= run.data.seq_len,
            "sweep.prompt_len",
            f"{sp.prompt_len} is above data.seq_len={run.data.seq_len} (prompts are held-out rows)",
        )
        check(
            sp.prompt_len + sp.new_tokens <= run.model.max_len,
            "sweep.new_tokens",
            f"prompt_len + new_tokens = {sp.prompt_len + sp.new_tokens} is above the model's "
            f"cache (model.max_len={run.model.max_len})",
        )
    return run
