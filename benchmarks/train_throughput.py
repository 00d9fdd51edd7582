r"""Training throughput of a named config: tokens/s and, on a GPU, model FLOPs utilisation.

    python benchmarks/train_throughput.py --config=experiments/tiny.py [--steps=20]
    python benchmarks/train_throughput.py --config=experiments/gpu_base.py --peak_tflops=989

Times the jitted train step (main + drafter, forward + backward + AdamW) on
random tokens after a warm-up, and compares it side by side in the same run
with a nearly main-only step (the smallest drafter: one Medusa head, loss
weight 0) to show what the drafter adds to training cost. FLOPs
per token use the standard 6N + attention estimate (Kaplan et al. 2020 /
PaLM appendix B) over the main model and drafter parameters.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from mtp.config import resolve
from mtp.data.tokenizer import tokenizer_of
from mtp.sharding import batch_sharding, global_batch, make_mesh, state_shardings
from mtp.train.steps import init_train_state, jit_steps

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Accelerator peak TFLOP/s for MFU (0: auto).")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

# Dense bf16 peak per device kind (TFLOP/s), for MFU when --peak_tflops is not given.
PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5e": 197.0}


def flops_per_token(run, n_params: int) -> float:
    """6N for the weights plus 6 * n_layers * seq_len * d_model for attention (causal, fwd+bwd)."""
    m = run.model
    return 6.0 * n_params + 6.0 * m.n_layers * run.data.seq_len * m.d_model


def measure(run, steps: int) -> dict:
    mesh = make_mesh()
    graphdef, state = init_train_state(run, tokenizer_of(run))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0])))
    shardings = state_shardings(state, mesh, run.train.sharding)
    state = jax.device_put(state, shardings)
    train_step, _ = jit_steps(graphdef, run.train, shardings, batch_sharding(mesh))
    rng = np.random.default_rng(0)
    shape = (run.data.batch_size, run.data.seq_len)
    batch = global_batch(
        {"tokens": rng.integers(0, 256, shape).astype(np.int32),
         "loss_mask": np.ones(shape, np.float32)}, mesh,
    )  # fmt: skip
    for _ in range(3):
        state, m = train_step(state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = train_step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    tokens_per_s = run.data.batch_size * run.data.seq_len / dt
    return {
        "params": int(n_params),
        "step_ms": 1e3 * dt,
        "tokens_per_s": tokens_per_s,
        "tflops": flops_per_token(run, n_params) * tokens_per_s / 1e12,
    }


def main(argv):
    del argv
    run = resolve(_CONFIG.value)
    main_only = run.replace(
        drafter=dataclasses.replace(run.drafter, kind="medusa", k=1),
        train=dataclasses.replace(run.train, draft_weight=0.0),
    )
    rows = {"main+drafter": measure(run, _STEPS.value),
            "main (+1 head)": measure(main_only, _STEPS.value)}  # fmt: skip
    device = jax.devices()[0]
    peak = _PEAK.value or next((v for k, v in PEAKS.items() if k in device.device_kind), 0.0)
    print(f"device: {jax.device_count()} x {device.device_kind} ({device.platform})")
    print(f"config: {dataclasses.asdict(run.model)}  k={run.drafter.k}  batch "
          f"{run.data.batch_size} x {run.data.seq_len}")  # fmt: skip
    print("| step | params | ms/step | tokens/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        mfu = f"{r['tflops'] / (peak * jax.device_count()):.1%}" if peak else "n/a (CPU)"
        r["mfu"] = r["tflops"] / (peak * jax.device_count()) if peak else None
        print(f"| {name} | {r['params'] / 1e6:.2f}M | {r['step_ms']:.1f} | "
              f"{r['tokens_per_s']:.0f} | {r['tflops']:.3f} | {mfu} |")  # fmt: skip
    ratio = rows["main+drafter"]["tokens_per_s"] / rows["main (+1 head)"]["tokens_per_s"]
    print(f"joint training runs at {ratio:.2f}x the main-only tokens/s")
    print("command: python " + " ".join(sys.argv))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"device": device.device_kind, "rows": rows, "ratio": ratio}, f, indent=2)


if __name__ == "__main__":
    app.run(main)
