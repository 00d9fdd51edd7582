"""`train_and_evaluate(run, workdir)`: the one supervised loop, resumable from its workdir.

It serves the main job, the RL warm-up and the pause phases (a phase is the
run with its `data` / `train` sections replaced, started from another run's
weights with `init_from`), so each gets resume, evaluation and sharding.

Order matters for "damages nothing": the config, the data and the run
directory's compatibility are all checked before anything is written. Then:
restore the latest checkpoint (state + data iterator) if there is one, train,
evaluate every `eval_every` steps, save every `checkpoint_every` steps, on
SIGTERM save and return. Every step's loss and grad norm are checked on
device (`first_nonfinite`), read at log and checkpoint steps, and the
parameters are checked before each save: a NaN/Inf stops the run naming the
first bad step, its last good checkpoint kept. A damaged newest checkpoint is
set aside with a warning and the run resumes from the newest intact one.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from mtp import checkpoint as ckpt
from mtp.config import Run
from mtp.data.pipeline import eval_batches, split_arrays, train_iterator
from mtp.data.token_counts import most_frequent
from mtp.data.tokenizer import Tokenizer
from mtp.errors import NonFiniteLoss
from mtp.metrics import MetricWriter, format_table, is_main_process, progress
from mtp.sharding import batch_sharding, global_batch, host_slice, make_mesh, state_shardings
from mtp.train.lm_eval import LMEvaluator
from mtp.train.pretrained import with_checkpoint_shapes
from mtp.train.self_distill import PREFIX, distill_arrays
from mtp.train.steps import (
    all_finite,
    first_nonfinite,
    init_train_state,
    jit_steps,
    make_optimizer,
    trainable,
)


@contextlib.contextmanager
def sigterm_flag():
    """Yields a dict whose 'set' turns True on SIGTERM (preemption) instead of dying."""
    flag = {"set": False}
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        flag["set"] = True

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
        pass
    try:
        yield flag
    finally:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)


def kept(mngr) -> str:
    """Which checkpoint a stopped run keeps, for its message."""
    step = mngr.latest_step()
    return f"checkpoint step {step} kept" if step else "no checkpoint written yet"


def check_finite(first, mngr, state=None, step: int = 0) -> None:
    """NonFiniteLoss naming the first step whose loss or grad norm was NaN/Inf (`first`, from
    `first_nonfinite`), or, given `state`, that its parameters are NaN/Inf after `step`."""
    bad = jax.device_get(first)
    if bad["step"]:
        parts = {k: float(v) for k, v in bad.items() if k.startswith("loss")}
        what = "loss" if not np.isfinite(bad["loss"]) else "grad_norm"
        cause = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        raise NonFiniteLoss(
            f"{what} is {float(bad[what])} at step {int(bad['step'])} ({cause}, "
            f"grad_norm={float(bad['grad_norm']):.4g}); stopped, {kept(mngr)}. "
            "Lower train.lr or raise train.warmup_steps"
        )
    if state is not None and not bool(all_finite(state)):
        raise NonFiniteLoss(
            f"parameters are NaN/Inf after the update of step {step} (its loss was finite); "
            f"stopped, {kept(mngr)}. Lower train.lr or train.grad_clip"
        )


def evaluate(evaluator, state, step: int, writer: MetricWriter) -> dict:
    results = dict(evaluator.run(state))
    writer.write("eval", step, results)
    return results


def write_report(workdir, step: int, results: dict) -> str:
    """Final evaluation as a Markdown table, also saved as eval_report.{md,json}."""
    table = format_table([[k, v] for k, v in results.items()], ["metric", "value"])
    text = f"## Evaluation at step {step}\n\n{table}\n"
    if is_main_process():
        Path(workdir, "eval_report.md").write_text(text)
        Path(workdir, "eval_report.json").write_text(json.dumps({"step": step} | results, indent=2))
    return text


def with_draft_vocab(graphdef, state, run: Run, tok: Tokenizer, arrays) -> dict:
    """`state` whose system drafts over the `drafter.draft_vocab` most frequent target tokens
    of the training rows (the specials always among them)."""
    system, optimizer = nnx.merge(graphdef, state)
    train = arrays["train"]
    targets = train.get("targets", train["tokens"])[train["loss_mask"] > 0]
    s = tok.specials
    ids = most_frequent(
        [targets], run.drafter.draft_vocab, run.model.vocab_size, always=(s.eos, s.think_close)
    )
    system.set_draft_ids(ids)
    return nnx.state((system, optimizer))


def train_and_evaluate(run: Run, workdir, tok: Tokenizer, *, init_from=None) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final evaluation.

    init_from: a run directory whose trained system starts this one (fresh optimizer).
    """
    workdir = Path(workdir)
    run = with_checkpoint_shapes(run, tok)
    ckpt.check_compatible(run, workdir)
    distill = run.data.corpus.startswith(PREFIX)
    if not distill:  # read (and so check) the data before anything is written
        arrays = {split: split_arrays(run.data, tok, split) for split in ("train", "eval")}
    if is_main_process():
        ckpt.write_run(run, workdir)

    mesh = make_mesh()
    graphdef, abstract_state = init_train_state(run, tok, abstract=True)
    shardings = state_shardings(abstract_state, mesh, run.train.sharding)
    train_step, eval_step = jit_steps(graphdef, run.train, shardings, batch_sharding(mesh))
    mngr = ckpt.manager(workdir, run.train.keep_checkpoints)
    step, state, data_state = ckpt.restore_latest(mngr, ckpt.abstract(abstract_state, shardings))
    if step:
        if is_main_process():
            print(f"resuming {workdir} from step {step} of {run.train.steps}", flush=True)
    elif init_from is not None:  # a warm start: the trained system, a fresh optimizer
        system, _ = ckpt.load_system(init_from)
        optimizer = nnx.Optimizer(system, make_optimizer(run.train), wrt=trainable(run.train))
        state = jax.device_put(nnx.state((system, optimizer)), shardings)
    elif run.model.init_from:  # pretrained weights: read on the host, then placed
        state = jax.device_put(init_train_state(run, tok)[1], shardings)
    else:
        state = jax.jit(lambda: init_train_state(run, tok)[1], out_shardings=shardings)()
    if distill:  # written by the main model itself: generated once, then read back
        arrays = distill_arrays(run, tok, nnx.merge(graphdef, state)[0], workdir)
    if not step and run.drafter.draft_vocab:
        state = jax.device_put(with_draft_vocab(graphdef, state, run, tok, arrays), shardings)
    train_it = train_iterator(
        run.data, tok, jax.process_index(), jax.process_count(), arrays=arrays["train"]
    )
    if step:
        train_it.set_state(data_state)
    held_out = eval_batches(run.data, tok, run.train.eval_batches, arrays=arrays["eval"])

    evaluator = LMEvaluator(lambda s, b: eval_step(s, global_batch(host_slice(b), mesh)), held_out)
    writer = MetricWriter(workdir)
    tokens_per_step = run.data.batch_size * run.data.seq_len
    results, first_bad = {}, None
    try:
        with sigterm_flag() as preempted, progress(run.train.steps, initial=step) as bar:
            t0, t0_step = time.perf_counter(), step
            start = step
            in_flight = None
            while step < run.train.steps:
                state, metrics = train_step(state, global_batch(next(train_it), mesh))
                # at most two steps in flight: a SIGTERM saves within a step or two, not after
                # every step Python ran ahead to (async dispatch) has finished
                jax.block_until_ready(in_flight)
                in_flight = metrics
                step += 1
                first_bad = first_nonfinite(first_bad, step, metrics)
                bar.update(1)
                if step == t0_step + 1 and t0_step == start:  # exclude compile time from tok/s
                    jax.block_until_ready(metrics)
                    t0, t0_step = time.perf_counter(), step
                last = step == run.train.steps
                if step % run.train.log_every == 0 or last:
                    check_finite(first_bad, mngr)
                    m = jax.device_get(metrics)
                    dt = time.perf_counter() - t0
                    m["tokens_per_s"] = tokens_per_step * (step - t0_step) / max(dt, 1e-9)
                    t0, t0_step = time.perf_counter(), step
                    writer.write("train", step, m)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}",
                        tok_s=f"{m['tokens_per_s']:.0f}",
                        tok_pass=f"{1 + m['accepted_len']:.2f}",
                    )
                if step % run.train.checkpoint_every == 0 or last or preempted["set"]:
                    check_finite(first_bad, mngr, state, step)
                    ckpt.save(mngr, step, state, train_it.get_state(), force=preempted["set"])
                if step % run.train.eval_every == 0 or last:
                    results = evaluate(evaluator, state, step, writer)
                if preempted["set"]:
                    mngr.wait_until_finished()
                    print(
                        f"SIGTERM: saved step {step} to {workdir}; run the same command to resume"
                    )
                    return results
        if not results:  # resumed a finished run: evaluate the final state once more
            results = evaluate(evaluator, state, step, writer)
        print(write_report(workdir, step, results))
        return results
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
