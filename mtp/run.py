r"""Thin entry point; all logic is importable (notebooks call the same functions).

    python -m mtp.run --config=experiments/tiny.py --workdir=runs/tiny
    python -m mtp.run --config=experiments/tiny.py --workdir=runs/tiny --config.drafter.k=2
    python -m mtp.run --workdir=runs/tiny --mode=decode --prompt="def main("
    python -m mtp.run --workdir=runs/tiny[,runs/other,...] --mode=report
    python -m mtp.run --config=experiments/smollm2_drafter.py --workdir=runs/smol --mode=decode \
        --decode_modes=slow --prompt="What is the capital of France?"   # a pretrained main model
    python -m mtp.run --config=experiments/sweep_k.py --workdir=runs/sweep_k   # a sweep over k
    python -m mtp.run --config=experiments/pause.py --workdir=runs/pause   # pause tokens
    python -m mtp.run --workdir=runs/sweep_k --mode=report   # its table and plots
    python -m mtp.run --workdir=runs/smol --mode=export_drafter   # runs/smol/drafter.safetensors

Running the same train command again resumes. Bad input (config, data, run
directory) prints one line naming what is wrong and exits with status 2.
"""

from __future__ import annotations

import re
import sys
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from mtp.errors import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "decode", "report", "export_drafter"], "What to do."
)
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt text for --mode=decode.")
_DECODE_MODES = flags.DEFINE_list(
    "decode_modes", "slow,speculative,fast", "Decoding modes for --mode=decode."
)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate for --mode=decode.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy (--mode=decode).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed for --mode=decode.")
_CHAT = flags.DEFINE_bool(
    "chat",
    True,
    "--mode=decode: the prompt is a user message in the model's chat template, if "
    "its tokenizer has one (instruct models); --nochat continues the raw text.",
)
_THINK_BUDGET = flags.DEFINE_integer(
    "think_budget", 0, "--mode=decode: think mode thinks within N main passes, then answers."
)
_TAU = flags.DEFINE_float(
    "tau", 0.9, "--mode=decode, adaptive: keep drafts while their confidence is >= tau."
)
_TREE_NODES = flags.DEFINE_integer(
    "tree_nodes", 0, "--mode=decode, speculative: verify a draft tree of N nodes (0: a chain)."
)
_TREE_BEAMS = flags.DEFINE_integer(
    "tree_beams", 4, "--mode=decode, speculative with --tree_nodes: beams per tree depth."
)
_CONFIDENCE = flags.DEFINE_string(
    "confidence", "prob", "--mode=decode, adaptive: the drafts' confidence (prob, margin, learned)."
)


def _config():
    """The loaded --config; a file that cannot be loaded is a one-line UserError."""
    try:
        config = _CONFIG.value
        if config is None:
            raise UserError("--config is required (e.g. --config=experiments/tiny.py)")
        config.keys()  # config_flags raises only on first use
    except OSError as e:
        reason = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        raise UserError(f"--config: cannot load it ({reason})") from None
    return config


def _train():
    from mtp.config import resolve
    from mtp.programs import run_program

    result = run_program(resolve(_config()), _WORKDIR.value)
    if isinstance(result, str):  # a sweep's summary table
        print(result)


def _decode():
    from mtp.checkpoint import config_path, load_system
    from mtp.config import resolve
    from mtp.data.tokenizer import tokenizer_of
    from mtp.decode.report import decode_report
    from mtp.train.pretrained import with_checkpoint_shapes
    from mtp.train.steps import make_system

    if config_path(_WORKDIR.value).exists() or _CONFIG.value is None:
        system, run = load_system(_WORKDIR.value)
        tok = tokenizer_of(run)
    else:  # nothing trained there yet: the config's pretrained main model, drafter untrained
        run = resolve(_config())
        if not run.model.init_from:
            raise UserError(
                f"--workdir={_WORKDIR.value} holds no run; decode a trained run directory, or "
                "give a --config whose model.init_from names a pretrained checkpoint"
            )
        tok = tokenizer_of(run)
        run = with_checkpoint_shapes(run, tok)
        system = make_system(run, tok)
    print(
        decode_report(
            system,
            tok,
            _PROMPT.value,
            modes=_DECODE_MODES.value,
            max_new_tokens=_MAX_NEW.value,
            temperature=_TEMPERATURE.value,
            top_k=_TOP_K.value,
            top_p=_TOP_P.value,
            seed=_SEED.value,
            think_budget=_THINK_BUDGET.value,
            chat=_CHAT.value,
            tau=_TAU.value,
            confidence=_CONFIDENCE.value,
            tree_nodes=_TREE_NODES.value,
            tree_beams=_TREE_BEAMS.value,
        )
    )


def _export_drafter():
    from mtp.checkpoint import export_drafter

    path, run = export_drafter(_WORKDIR.value)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): the drafter alone, for the main "
        f"model {run.model.init_from}; start a drafter from it with "
        f"--config.drafter.init_from={path}"
    )


def _report():
    from mtp.metrics import compare_runs
    from mtp.programs.sweep import collect, runner

    workdirs = _WORKDIR.value.split(",")
    if len(workdirs) == 1 and Path(workdirs[0], runner.MANIFEST).exists():
        print(collect(workdirs[0]))  # a sweep: its table, and the plots written beside it
        return
    print(compare_runs(workdirs))


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from mtp.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    try:
        if not _WORKDIR.value:
            raise UserError("--workdir is required")
        for workdir in _WORKDIR.value.split(","):
            if Path(workdir).exists() and not Path(workdir).is_dir():
                raise UserError(f"--workdir={workdir} is a file; give a run directory")
        modes = {
            "train": _train,
            "decode": _decode,
            "report": _report,
            "export_drafter": _export_drafter,
        }
        modes[_MODE.value]()
    except UserError as e:
        _fail(str(e))


def _parse_flags(argv):
    """absl flag parsing; a config file that fails to load, or a bad `--config.X=V` override,
    is one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:
        if (reason := _config_file_error(e, argv)) is not None:
            _fail(f"--config: cannot load it ({reason})")
        if isinstance(e, flags.Error):
            _fail(str(e))
        if not isinstance(e, AttributeError | KeyError | TypeError | ValueError):
            raise
        hint = re.search(r'Did you mean "(\w+)"', str(e))
        overrides = " ".join(a.split("=")[0] for a in argv if a.startswith("--config."))
        _fail(
            f"bad config override {overrides}: no such field"
            + (f"; did you mean {hint[1]!r}?" if hint else f" ({type(e).__name__}: {e})")
        )


def _config_file_error(e: BaseException | None, argv) -> str | None:
    """'Error: message (FILE, line N)' if `e`, or one it was raised from, came out of the
    --config file (its import or its get_config); None if not (a bad override, say)."""
    values = [a.removeprefix("--config=") for a in argv if a.startswith("--config=")]
    values += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    paths = {Path(v.split(":")[0]).resolve() for v in values}
    while e is not None:
        frames = [(f.filename, f.lineno) for f in traceback.extract_tb(e.__traceback__)]
        if isinstance(e, SyntaxError):  # raised compiling the file: no frame of its own
            frames.append((e.filename or "", e.lineno))
        at = [(f, n) for f, n in frames if f and Path(f).resolve() in paths]
        if at:
            msg = e.msg if isinstance(e, SyntaxError) else str(e).strip().split("\n")[0]
            return f"{type(e).__name__}: {msg} ({at[-1][0]}, line {at[-1][1]})"
        e = e.__cause__ or e.__context__
    return None


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run():
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
