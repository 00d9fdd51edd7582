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
# # Fast thinking: teach the main model to talk to its drafter with RL
#
# The task: add two 4-digit numbers, writing the carry chain out as a thought
# between `<think>` and `</think>`, then the answer. In **fast** mode one main
# pass emits `1 + k` tokens of thought (its own token and `k` drafts, kept
# unverified); the answer is written in **slow** mode, one token per pass.
#
# 1. **Warm-up**: supervised training of the main model and its drafter on worked
#    examples.
# 2. **RL**: rollouts think in fast mode within a budget of main passes and are
#    rewarded for a correct answer. The log-prob of a pass is the main model's
#    log-prob of its token plus the drafter's of its drafts, so the gradient
#    reaches the main model through the residual stream the drafter reads: the
#    main model can learn to *tell* the drafter what to write. Two arms from the
#    same warm-up: drafter only (main frozen) and both (joint).
# 3. **Accuracy against main passes**: slow thinking, fast thinking with the
#    supervised drafter, and after each RL arm, at several pass budgets.
#
# `experiments/rl_arith.py` takes ~30 minutes on 2 CPU cores; a GPU runtime is
# faster. Re-running resumes: finished phases are skipped.

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
CONFIG_ARG = None  # experiments/rl_arith.py:CONFIG_ARG; "smoke" is a minute-long pipeline
WORKDIR = "runs/rl_fast_thinking"  # running the notebook again resumes it
EVAL_PROBLEMS = 128  # held-out problems for accuracy against passes
BUDGETS = (2, 4, 8, 0)  # main passes allowed for the thought (0: no limit)

# %%
import importlib.util
from pathlib import Path

import jax
import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

import mtp

ROOT = Path(mtp.__file__).resolve().parent.parent
print(f"JAX {jax.__version__}, backend {jax.default_backend()}: {jax.devices()}")

spec = importlib.util.spec_from_file_location("rl_arith", ROOT / "experiments/rl_arith.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config(CONFIG_ARG)

from mtp.config import resolve
from mtp.data.format import render
from mtp.data.task_data import parse_task_spec

run = resolve(config)
task, _ = parse_task_spec(run.rl.task)
print(f"task {run.rl.task}, k = {run.drafter.k}, RL arms: {', '.join(run.rl.trainable)}")
print("a worked example:", render(task.examples("train", 1)[0]))

# %% [markdown]
# ## Warm-up, then RL
#
# The same call as `python -m mtp.run --config=experiments/rl_arith.py --workdir=...`:
# `WORKDIR/warmup/` (supervised), then `WORKDIR/rl_<arm>/` per RL arm.

# %%
from mtp.programs import run_program

summary = run_program(run, WORKDIR)

# %% [markdown]
# RL curves per arm: reward (correct answers, minus any price per pass), main
# passes per rollout, and how often the drafter's tokens agree with the main
# model's own greedy choice.

# %%
from mtp.metrics import read_csv

curves = {arm: read_csv(Path(WORKDIR) / f"rl_{arm}", f"rl_{arm}") for arm in run.rl.trainable}
fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
for ax, metric in zip(axes, ("reward", "passes", "agree"), strict=True):
    for arm, rows in curves.items():
        pts = [(r["step"], r[metric]) for r in rows if metric in r]
        ax.plot([s for s, _ in pts], [v for _, v in pts], "o-", label=arm)
    ax.set(xlabel="RL step", title=metric)
    ax.legend()
plt.show()

# %% [markdown]
# ## One held-out problem, thought slow and fast
#
# The warm-up model thinks in slow mode (one token per pass), then the jointly
# trained one in `think` mode: fast inside the thought, slow for the answer.

# %%
from mtp.checkpoint import load_system
from mtp.data.format import encode_prompt
from mtp.data.tokenizer import tokenizer_of
from mtp.decode.engine import Decoder
from mtp.rl.learner import load_rl_system

tok = tokenizer_of(run)
problem = task.examples("eval", 1)[0]
ids = encode_prompt(tok, problem.prompt)
room = run.model.max_len - ids.size
arm = "both" if "both" in run.rl.trainable else run.rl.trainable[-1]
for name, system, mode in (
    ("warm-up, slow", load_system(Path(WORKDIR) / "warmup")[0], "slow"),
    (f"RL ({arm}), think", load_rl_system(Path(WORKDIR) / f"rl_{arm}")[0], "think"),
):
    res = Decoder(system, tok.specials).generate([ids], mode=mode, max_new_tokens=room)
    text = res.texts(tok)[0]
    answer = text.split("</think>")[-1].replace("<eos>", "")
    per_pass = res.stats["tokens_per_pass"]
    print(f"--- {name}: {int(res.passes[0])} main passes, {per_pass:.2f} tokens per pass")
    print(f"{problem.prompt}<think>{text}")
    print(f"score {task.score(problem.prompt, answer.strip())}, truth {problem.answer!r}")

# %% [markdown]
# ## Accuracy against main passes
#
# `mtp.evals.rl_report` (also `python -m mtp.evals.rl_report --workdir=...`)
# decodes the held-out problems greedily with every system at every budget,
# and states whether joint RL met the aim: fast thinking within 5 points of slow
# accuracy at no more than 40% of its main passes.

# %%
from mtp.evals.rl_report import report

text = report(WORKDIR, n=EVAL_PROBLEMS, budgets=BUDGETS, batch_size=min(64, EVAL_PROBLEMS))
display(Markdown(text))
display(Image(filename=str(Path(WORKDIR) / "rl_report.png")))
