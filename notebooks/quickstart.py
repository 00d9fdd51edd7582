# ---
# jupyter:
#   accelerator: GPU
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # mtp quickstart: train a main model and its drafter, decode in every mode
#
# A main transformer emits one token per forward pass; a small **drafter** reads
# its residual stream and drafts the next `k` tokens. This notebook trains both
# together on the Python standard library's own source (no download), then
# decodes the same prompt in `slow`, `speculative`, `fast` and `think` mode and
# compares tokens per main pass and tokens/s.
#
# In Colab: *Runtime → Change runtime type → GPU* (or TPU), then run all. On a
# CPU the default size trains in ~5 minutes; on a GPU in about one.

# %%
# Colab: install mtp from its repository with the JAX build for the accelerator.
# Anywhere else (a local checkout with `pip install -e .`) this cell does nothing.
import os
import shutil
import subprocess
import sys

REPO_URL = os.environ.get("MTP_REPO_URL", "")  # the git URL of the mtp repository
if "google.colab" in sys.modules:
    if not os.path.exists("mtp/setup.cfg"):
        if not REPO_URL:
            raise SystemExit("set REPO_URL (above) to the git URL of the mtp repository")
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, "mtp"], check=True)
    if shutil.which("nvidia-smi"):
        jax_build = "jax[cuda12]"
    elif "COLAB_TPU_ADDR" in os.environ or os.path.exists("/dev/accel0"):
        jax_build = "jax[tpu]"
    else:
        jax_build = "jax"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", "mtp", jax_build], check=True
    )
    sys.path.insert(0, os.path.abspath("mtp"))  # the running kernel predates the install

# %% tags=["parameters"]
STEPS = 600  # training steps of experiments/tiny.py
OVERRIDES = {}  # config fields to change, e.g. {"drafter.k": 2, "drafter.kind": "rnn"}
WORKDIR = "runs/quickstart"  # run directory; running the notebook again resumes it
PROMPT = "def main("
MAX_NEW_TOKENS = 96

# %%
import importlib.util
from pathlib import Path

import jax
import matplotlib.pyplot as plt
import numpy as np

import mtp

ROOT = Path(mtp.__file__).resolve().parent.parent  # the repository: experiments/ lives here
print(f"JAX {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}")


def load_experiment(name, arg=None):
    """get_config(arg) of experiments/NAME.py, as `--config=experiments/NAME.py:arg` does."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# %% [markdown]
# ## Train
#
# `experiments/tiny.py`: a 0.8M-parameter main model and a one-layer transformer
# drafter with `k = 4`, trained jointly (next-token loss + drafter loss on the
# next `k` tokens). On an accelerator the matmuls run in bfloat16. The same call
# as `python -m mtp.run --config=experiments/tiny.py --workdir=...`.

# %%
from mtp.config import resolve
from mtp.programs import run_program

config = load_experiment("tiny")
config.train.steps = STEPS
config.train.eval_every = min(config.train.eval_every, STEPS)
if jax.default_backend() != "cpu":
    config.model.dtype = "bfloat16"
for field, value in OVERRIDES.items():
    section, name = field.split(".")
    config[section][name] = value
run = resolve(config)
print(f"main: {run.model.n_layers} layers, d_model {run.model.d_model}; drafter: {run.drafter}")
results = run_program(run, WORKDIR)

# %% [markdown]
# Training curves (`WORKDIR/metrics/*.csv`): the loss falls, and the drafter's
# top-1 accuracy at each offset `j` rises far above the best constant guess.

# %%
from mtp.metrics import read_csv

train, evals = read_csv(WORKDIR, "train"), read_csv(WORKDIR, "eval")
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.5))
ax0.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (main + draft)")
ax0.plot([r["step"] for r in evals], [r["main_loss"] for r in evals], "o-", label="eval main loss")
ax0.set(xlabel="step", ylabel="nats per byte", title="Loss")
ax0.legend()
k = run.drafter.k
for j in range(1, k + 1):
    ax1.plot([r["step"] for r in evals], [r[f"acc_draft_{j}"] for r in evals], "o-", label=f"j={j}")
ax1.axhline(evals[-1]["unigram_acc"], color="gray", ls=":", label="unigram")
ax1.set(xlabel="step", ylabel="top-1 accuracy", title="Drafter accuracy at offset j")
ax1.legend()
plt.show()
print({name: round(v, 3) for name, v in results.items()})

# %% [markdown]
# ## Decode in every mode
#
# - `slow`: one main token per pass (plain autoregressive decoding);
# - `speculative`: the drafts are verified by the next main pass — greedy output
#   identical to `slow`, in fewer passes;
# - `fast`: every draft is kept unverified: exactly `1 + k` tokens per pass;
# - `think`: `fast` inside a `<think>` span, `slow` after `</think>` (this code
#   model never closes a span; see `rl_fast_thinking.ipynb` for a task that does).
#
# Each mode's first call compiles; its timing is the best of three calls after it.

# %%
from mtp.checkpoint import load_system
from mtp.data.tokenizer import tokenizer_of
from mtp.decode.engine import Decoder

system, _ = load_system(WORKDIR)
tok = tokenizer_of(run)
decoder = Decoder(system, tok.specials)
stats = {}
for mode in ("slow", "speculative", "fast", "think"):
    text = ("<think>" if mode == "think" else "") + PROMPT
    ids = np.concatenate([[tok.specials.bos], tok.encode_with_specials(text)])
    decoder.generate([ids], mode=mode, max_new_tokens=MAX_NEW_TOKENS)  # compile
    runs = [decoder.generate([ids], mode=mode, max_new_tokens=MAX_NEW_TOKENS) for _ in range(3)]
    res = min(runs, key=lambda r: r.wall_s)
    stats[mode] = res.stats
    print(f"--- {mode}: {res.stats['tokens_per_pass']:.2f} tokens per main pass")
    print(text + res.texts(tok)[0])

# %%
modes = list(stats)
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.5))
ax0.bar(modes, [stats[m]["tokens_per_pass"] for m in modes])
ax0.set(ylabel="tokens per main pass", title=f"Tokens per pass (k = {k})")
ax1.bar(modes, [stats[m]["tokens_per_s"] for m in modes])
ax1.set(ylabel="tokens/s", title=f"Decoding speed, batch 1 ({jax.default_backend()})")
plt.show()
spec = stats["speculative"]
print(
    f"speculative: {spec['mean_accepted']:.2f} drafts accepted per verify pass, "
    f"{spec['tokens_per_s'] / stats['slow']['tokens_per_s']:.2f}x the tokens/s of slow"
)
