"""`train_and_evaluate(config, workdir)`: the supervised loop, resumable from its workdir.

Order matters for "damages nothing": the config, the data and the run
directory's compatibility are all checked before anything is written. Then:
restore the latest checkpoint (state + data iterator) if there is one, train,
evaluate every `eval_every` steps, save every `checkpoint_every` steps, on
SIGTERM save and return, on a NaN/Inf loss stop with the step and keep the
last good checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from pathlib import Path

import jax

from mtp import checkpoint as ckpt
from mtp.config import UserError, validate
from mtp.data.pipeline import eval_batches, train_iterator
from mtp.data.tokenizer import ByteTokenizer
from mtp.evals.lm import LMEvaluator
from mtp.metrics import MetricWriter, format_table, is_main_process, progress
from mtp.sharding import batch_sharding, global_batch, host_slice, make_mesh, state_shardings
from mtp.train.steps import init_train_state, jit_steps


class NonFiniteLoss(UserError):
    """The loss became NaN or Inf; the run stops, its last good checkpoint kept."""


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


def _check_finite(step: int, metrics: dict) -> None:
    loss = float(metrics["loss"])
    if not math.isfinite(loss):
        parts = {k: float(v) for k, v in metrics.items() if k.startswith("loss")}
        cause = ", ".join(f"{k}={v:.4g}" for k, v in parts.items())
        grad_norm = float(metrics["grad_norm"])
        raise NonFiniteLoss(
            f"loss is {loss} at step {step} ({cause}, grad_norm={grad_norm:.4g}); "
            "stopped, last good checkpoint kept. Lower train.lr or raise train.warmup_steps"
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


def train_and_evaluate(config, workdir) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final evaluation."""
    cs = validate(config)
    workdir = Path(workdir)
    ckpt.check_compatible(config, workdir)
    tok = ByteTokenizer()
    train_it = train_iterator(
        cs.data, tok, process_index=jax.process_index(), process_count=jax.process_count()
    )
    held_out = eval_batches(cs.data, tok, cs.train.eval_batches)
    if is_main_process():
        ckpt.write_config(config, workdir)

    mesh = make_mesh()
    graphdef, abstract_state = init_train_state(cs, abstract=True)
    shardings = state_shardings(abstract_state, mesh, cs.train.sharding)
    train_step, eval_step = jit_steps(graphdef, cs.train, shardings, batch_sharding(mesh))
    mngr = ckpt.manager(workdir, cs.train.keep_checkpoints)
    step = mngr.latest_step() or 0
    if step:
        state, data_state = ckpt.restore(mngr, step, ckpt.abstract(abstract_state, shardings))
        train_it.set_state(data_state)
    else:
        state = jax.jit(lambda: init_train_state(cs)[1], out_shardings=shardings)()

    evaluator = LMEvaluator(lambda s, b: eval_step(s, global_batch(host_slice(b), mesh)), held_out)
    writer = MetricWriter(workdir)
    tokens_per_step = cs.data.batch_size * cs.data.seq_len
    results = {}
    try:
        with sigterm_flag() as preempted, progress(cs.train.steps, initial=step) as bar:
            t0, t0_step = time.perf_counter(), step
            start = step
            while step < cs.train.steps:
                state, metrics = train_step(state, global_batch(next(train_it), mesh))
                step += 1
                bar.update(1)
                if step == t0_step + 1 and t0_step == start:  # exclude compile time from tok/s
                    jax.block_until_ready(metrics)
                    t0, t0_step = time.perf_counter(), step
                last = step == cs.train.steps
                if step % cs.train.log_every == 0 or last:
                    m = jax.device_get(metrics)
                    _check_finite(step, m)
                    dt = time.perf_counter() - t0
                    m["tokens_per_s"] = tokens_per_step * (step - t0_step) / max(dt, 1e-9)
                    t0, t0_step = time.perf_counter(), step
                    writer.write("train", step, m)
                    bar.set_postfix(
                        loss=f"{m['loss']:.3f}",
                        tok_s=f"{m['tokens_per_s']:.0f}",
                        tok_pass=f"{1 + m['accepted_len']:.2f}",
                    )
                if step % cs.train.checkpoint_every == 0 or last or preempted["set"]:
                    _check_finite(step, jax.device_get(metrics))
                    ckpt.save(mngr, step, state, train_it.get_state(), force=preempted["set"])
                if step % cs.train.eval_every == 0 or last:
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
