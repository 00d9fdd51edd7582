r"""Sweep the number of drafted tokens k (1, 2, 4, 8) for each drafter kind.

One supervised run per (kind, k) on the stdlib code corpus, the model of
tiny.py, each in WORKDIR/k{K}_{KIND}; then every run decodes held-out
prompts slow vs speculative (greedy, batch 1) and the sweep writes
WORKDIR/sweep_summary.{csv,md} and WORKDIR/plots/*.png: drafter accuracy per
offset, mean accepted length, speculative speedup and tokens/s against k.
    python -m mtp.run --config=experiments/sweep_k.py --workdir=runs/sweep_k
Re-running skips finished runs and resumes the others. One member per host
(by name or index), then collect:
    python -m mtp.run --config=experiments/sweep_k.py --workdir=runs/sweep_k \
        --config.sweep.only=k4_transformer
    python -m mtp.run --workdir=runs/sweep_k --mode=report
Arguments: (none) CPU size, 12 runs of 400 steps: 2 CPU cores ~1.5-2 h in
sequence (k = 8 trains ~2x slower than k = 1); `tiny` a seconds-sized sweep
of 4 runs for the tests (~1 min); `gpu` the model of gpu_base.py, 1,000
steps per run (one GPU per member: ~12 members x ~5 min on an H100, estimated).
Expect: accuracy falling with the offset; accepted length rising with k
but saturating (each extra draft is accepted less often); speculative
tokens/s peaking at a small k on the CPU, where the drafter's cost per pass
is close to the main model's.
"""

import dataclasses
import importlib.util
from pathlib import Path

from mtp.config import SweepConfig, default_config


def _sibling(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


VARIANTS = ("cpu", "tiny", "gpu")


def get_config(arg=None):
    size = arg or "cpu"
    if size not in VARIANTS:
        raise ValueError(f"experiments/sweep_k.py:{arg}: the argument is one of {VARIANTS}")
    if size == "tiny":
        c = default_config()
        c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_len=64)
        c.drafter.update(n_heads=2)
        c.data.update(seq_len=32, batch_size=4, max_bytes=60_000)
        c.train.update(steps=6, lr=1e-2, warmup_steps=2, log_every=3, eval_every=6,
                       eval_batches=2, checkpoint_every=6)  # fmt: skip
        sweep = SweepConfig(ks=(1, 2), kinds=("transformer", "medusa"), speedup_prompts=2,
                            prompt_len=16, new_tokens=16, repeats=1)  # fmt: skip
    elif size == "cpu":
        c = _sibling("tiny")
        c.train.update(steps=400, eval_every=200, checkpoint_every=100)
        sweep = SweepConfig(speedup_prompts=8, prompt_len=64, new_tokens=128)
    else:
        c = _sibling("gpu_base")
        c.train.update(steps=1000, warmup_steps=100, eval_every=500, checkpoint_every=500)
        sweep = SweepConfig(speedup_prompts=8, prompt_len=64, new_tokens=256)
    if size != "tiny":
        sweep = dataclasses.replace(sweep, ks=(1, 2, 4, 8), kinds=("transformer", "medusa", "rnn"))
    c.program = "sweep"
    c.sweep = dataclasses.asdict(sweep)
    return c
