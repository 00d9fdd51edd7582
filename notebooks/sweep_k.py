# ---
# jupyter:
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: colab
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
# # Sweeps over k: how many tokens should the drafter draft per pass?
#
# A sweep trains one main model + drafter per drafter kind and per `k`, then
# decodes held-out prompts slow vs speculative with each. This notebook loads a
# finished sweep and plots it. Run the sweep from a shell first (it resumes, and
# skips finished runs when started again):
#
# ```bash
# python -m mtp.run --config=experiments/sweep_k.py --workdir=runs/sweep_k   # CPU: ~1.5-2 h
# ```
#
# or one member per host (`--config.sweep.only=k4_transformer`), then
# `python -m mtp.run --workdir=runs/sweep_k --mode=report` to collect. If
# `SWEEP_DIR` holds no sweep, the next cells run the `CONFIG_ARG` size here.

# %%
# Colab: install mtp from its repository (a local checkout skips this cell's work).
import os
import subprocess
import sys

REPO_URL = os.environ.get("MTP_REPO_URL", "")  # the git URL of the mtp repository
if "google.colab" in sys.modules:
    if not os.path.exists("mtp/setup.cfg"):
        if not REPO_URL:
            raise SystemExit("set REPO_URL (above) to the git URL of the mtp repository")
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, "mtp"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "mtp"], check=True)
    sys.path.insert(0, os.path.abspath("mtp"))  # the running kernel predates the install

# %% tags=["parameters"]
SWEEP_DIR = "runs/sweep_k"  # a sweep's workdir
CONFIG_ARG = "tiny"  # if SWEEP_DIR holds no sweep: run experiments/sweep_k.py:CONFIG_ARG here
SWEEP = {}  # overrides of the sweep section for that run, e.g. {"ks": (1, 2, 4)}

# %%
import importlib.util
from pathlib import Path

import matplotlib.pyplot as plt
from IPython.display import Image, Markdown, display

import mtp
from mtp.config import resolve
from mtp.programs import run_program
from mtp.programs.sweep import collect, load_rows

ROOT = Path(mtp.__file__).resolve().parent.parent

if not (Path(SWEEP_DIR) / "sweep.json").exists():
    spec = importlib.util.spec_from_file_location("sweep_k", ROOT / "experiments/sweep_k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(CONFIG_ARG)
    config.sweep.update(**SWEEP)
    run_program(resolve(config), SWEEP_DIR)  # as `python -m mtp.run --config=...` does

# %% [markdown]
# ## The summary table
#
# `collect` reads every member's `eval_report.json`, training throughput and
# `speedup.json`, and writes `sweep_summary.{csv,md}` and `plots/*.png` beside
# them (the same as `--mode=report`). Unfinished members show `-`.

# %%
display(Markdown(collect(SWEEP_DIR)))

# %% [markdown]
# ## The sweep's own plots
#
# Drafter accuracy per offset; mean accepted drafts per pass, implied by the
# evaluation's accuracy and measured in speculative decoding; the speculative
# speedup over slow decoding; training and decoding tokens/s, all against `k`.

# %%
for name in ("draft_accuracy", "accepted_length", "speedup", "tokens_per_s"):
    display(Image(filename=str(Path(SWEEP_DIR) / "plots" / f"{name}.png")))

# %% [markdown]
# ## Your own plot from the rows
#
# `load_rows` gives one dict per member (`name`, `k`, `kind`, every metric of
# its evaluation and of its speedup measurement). Here: main-model loss and
# tokens per main pass against `k` — does drafting further ahead cost the main
# model anything when the drafter's gradient reaches it?

# %%
rows = [r for r in load_rows(SWEEP_DIR) if r["finished"]]
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.5))
for kind in dict.fromkeys(r["kind"] for r in rows):
    mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["k"])
    ks = [r["k"] for r in mine]
    ax0.plot(ks, [r["main_loss"] for r in mine], "o-", label=kind)
    ax1.plot(ks, [r["tokens_per_pass"] for r in mine], "o-", label=f"{kind}, implied")
    if all("spec_tokens_per_pass" in r for r in mine):
        ax1.plot(ks, [r["spec_tokens_per_pass"] for r in mine], "s--", label=f"{kind}, measured")
for ax, title in ((ax0, "Main model eval loss"), (ax1, "Tokens per main pass")):
    ax.set(xscale="log", xlabel="k", title=title)
    ax.set_xticks(sorted({r["k"] for r in rows}), [str(k) for k in sorted({r["k"] for r in rows})])
    ax.minorticks_off()
    ax.legend()
plt.show()
