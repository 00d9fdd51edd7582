"""Self-distillation data: the main model's own continuations of task prompts, and its taps.

    data.corpus = "distill:rg_chain_sum:n=512"

A drafter on a frozen pretrained main learns best from what that main model
itself writes, not from someone else's text (Medusa, EAGLE): speculative
verification accepts exactly the main model's choices. The rows are generated
once, in batches, with the decoding engine (slow mode, greedy unless
`data.distill_temperature` > 0), stored as an ArrayRecord dataset in
WORKDIR/distill, and read back on resume. Only the generated tokens are
targets; the prompt is context.

With `data.cache_taps`, the frozen main model's taps over those rows are
computed once too, so training steps run the drafter alone (the main model's
parameters get no update in the frozen recipe, so its taps never change). The
drafter at position t reads only the tap at t and the tokens after it, so each
row is then cut to its generated window (from the last prompt token on): the
prompt's positions, which have no targets, cost nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import Run
from mtp.data.format import encode_chat_prompt
from mtp.data.pipeline import Arrays
from mtp.data.rows_dataset import SPLITS, is_prepared, read_rows, write_rows
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import Tokenizer
from mtp.decode.engine import Decoder
from mtp.decode.sampling import Sampling
from mtp.errors import DataError
from mtp.metrics import progress
from mtp.model.system import MTPSystem

PREFIX = "distill:"


def dataset_name(run: Run) -> str:
    """Names what made the rows: task spec, main model, row length, temperature."""
    what = f"{run.data.corpus.removeprefix(PREFIX)}-{run.model.init_from or 'scratch'}"
    what += f"-T{run.data.seq_len}-temp{run.data.distill_temperature:g}"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", what)[:200]


def generate_rows(run: Run, tok: Tokenizer, system: MTPSystem, split: str) -> tuple:
    """(tokens (N, T), loss_mask (N, T)): chat prompts of the task's `split`, each followed by
    the main model's continuation up to <eos> or the row's end; only the continuation is a
    target."""
    task, n = parse_task_spec(run.data.corpus.removeprefix(PREFIX))
    if split == "eval":
        n = max(1, round(n * run.data.eval_fraction))  # generating is costly: no floor of 64
    # Wider generation calls amortise each pass's weight reads over more rows.
    t, b = run.data.seq_len, run.data.distill_batch_size or run.data.batch_size
    prompts = [encode_chat_prompt(tok, ex.prompt) for ex in task.examples(split, n, start=0)]
    longest = max(p.size for p in prompts)
    if longest >= t:
        raise DataError(
            f"data.corpus {run.data.corpus!r}: a chat prompt of {split} has {longest} tokens, "
            f"no room for an answer in data.seq_len={t}; raise data.seq_len"
        )
    rows = np.full((n, t), tok.specials.pad, np.int32)
    mask = np.zeros((n, t), np.float32)
    dec = Decoder(system, tok.specials)
    sampling = Sampling(temperature=run.data.distill_temperature)
    with progress(n, desc=f"self-distillation ({split})") as bar:
        for i in range(0, n, b):
            batch = prompts[i : i + b]
            new = t - max(p.size for p in batch)
            res = dec.generate(batch, mode="slow", max_new_tokens=new, sampling=sampling, seed=i)
            for j, p in enumerate(batch):
                out = res.row(j)
                rows[i + j, : p.size] = p
                rows[i + j, p.size : p.size + out.size] = out
                mask[i + j, p.size : p.size + out.size] = 1.0  # target x_t: emitted by the model
            bar.update(len(batch))
    return rows, mask


def distill_arrays(run: Run, tok: Tokenizer, system: MTPSystem, workdir) -> dict[str, Arrays]:
    """`{split: arrays}` of the self-distillation rows (+ 'taps' with data.cache_taps),
    generated on first use and read back afterwards."""
    data_dir, name, t = Path(workdir) / "distill", dataset_name(run), run.data.seq_len
    if not is_prepared(name, data_dir, t):
        write_rows(name, data_dir, {s: generate_rows(run, tok, system, s) for s in SPLITS})
    out = {
        split: dict(zip(("tokens", "loss_mask"), read_rows(name, data_dir, t, split), strict=True))
        for split in SPLITS
    }
    if run.data.cache_taps:  # both splits in one call: one compilation
        rows = np.concatenate([out[split]["tokens"] for split in SPLITS])
        taps, start = main_taps(system, rows, run.data.batch_size), 0
        for split in SPLITS:
            n = out[split]["tokens"].shape[0]
            split_taps, start = taps[start : start + n], start + n
            out[split] = generated_windows(
                **out[split], taps=split_taps, pad=tok.specials.pad, past=run.drafter.context
            )
    return out


def generated_windows(tokens, loss_mask, taps, pad: int, past: bool = False) -> Arrays:
    """Rows (N, T), mask (N, T) and taps (N, T, L, D) cut to each row's window from its last
    prompt token (the first position with a target after it) to its end: (N, W) and
    (N, W, L, D), W the longest window. With `past` (a drafter that reads the context) also
    the taps before each window, right-aligned: 'past_taps' (N, P, L, D) and 'past_mask'
    (N, P), P the longest prompt less its last token (`mtp.model.drafter.Past`)."""
    rows, mask = tokens, loss_mask
    has = (mask > 0).any(1)  # a row the model ended at once has no window
    first = np.where(has, np.argmax(mask > 0, axis=1) - 1, 0)  # the last prompt token
    ends = np.where(has, mask.shape[1] - np.argmax(mask[:, ::-1] > 0, axis=1), 0)
    w, p = int((ends - first).max()), int(first.max())
    out = {
        "tokens": np.full((rows.shape[0], w), pad, np.int32),
        "loss_mask": np.zeros((rows.shape[0], w), np.float32),
        "taps": np.zeros((rows.shape[0], w, *taps.shape[2:]), taps.dtype),
    }
    if past:
        out["past_taps"] = np.zeros((rows.shape[0], p, *taps.shape[2:]), taps.dtype)
        out["past_mask"] = np.zeros((rows.shape[0], p), np.float32)
    for i, (a, e) in enumerate(zip(first, ends, strict=True)):
        out["tokens"][i, : e - a] = rows[i, a:e]
        out["loss_mask"][i, : e - a] = mask[i, a:e]
        out["taps"][i, : e - a] = taps[i, a:e]
        if past:
            out["past_taps"][i, p - a :] = taps[i, :a]
            out["past_mask"][i, p - a :] = 1.0
    return out


def main_taps(system: MTPSystem, rows: np.ndarray, batch: int) -> np.ndarray:
    """(N, T, L, D) taps of the main model over `rows` (N, T), as the drafter reads them, in
    the main model's compute dtype."""
    graphdef, state = nnx.split(system)

    @jax.jit
    def taps_of(state, tokens_bt):
        return nnx.merge(graphdef, state).main_taps(tokens_bt)

    n = rows.shape[0]
    pad = -n % batch
    padded = np.concatenate([rows, np.repeat(rows[-1:], pad, 0)]) if pad else rows
    parts = []
    with progress(padded.shape[0], desc="caching taps") as bar:
        for i in range(0, padded.shape[0], batch):
            parts.append(np.asarray(taps_of(state, jnp.asarray(padded[i : i + batch]))))
            bar.update(batch)
    return np.concatenate(parts)[:n]
