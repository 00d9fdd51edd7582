"""Self-distillation data: the main model's own continuations of task prompts, and its taps.

    data.corpus = "distill:rg_chain_sum:n=512"

A drafter on a frozen pretrained main learns best from what that main model
itself writes, not from someone else's text (Medusa, EAGLE): speculative
verification accepts exactly the main model's choices. The rows are generated
once, in batches, with the decoding engine (slow mode, greedy unless
`data.distill_temperature` > 0), stored as an ArrayRecord dataset in
WORKDIR/distill, and read back on resume. Only the generated tokens are
targets; the prompt is context.

With `data.cache_taps`, the frozen main model's taps over those rows are kept
too, so training steps run the drafter alone (the main model's parameters get no
update in the frozen recipe, so its taps never change). The decoding passes that
write the rows compute them anyway (`generate(keep_taps=True)`); they are stored
beside the rows (WORKDIR/distill/taps), so no second pass over the rows runs
(that pass cost 7 of the recipe's 41 minutes). The drafter at position t reads
only the tap at t and the tokens after it, so each row is then cut to its
generated window (from the last prompt token on): the prompt's positions, which
have no targets, cost nothing.

Generating is the costly part (one main pass per token per row; about 80 tokens/s
at batch 16 on 2 CPU cores for SmolLM2-135M, against about 800 for a teacher-forced
pass). `data.teacher_forced` adds rows at the cheaper rate: a task's prompts with
its worked solutions, which the main model reads once. There the drafter's targets
are the main model's own greedy choices, the argmax of its logits before each
token, not the solution's tokens: what it would accept in verification had it
written that prefix itself. The drafter still reads the solution's tokens.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import Run
from mtp.data.format import encode_chat_prompt, encode_plain_reply
from mtp.data.pipeline import Arrays
from mtp.data.rows_dataset import SPLITS, is_prepared, read_rows, read_taps, write_rows, write_taps
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
    if run.data.distill_max_new:
        what += f"-new{run.data.distill_max_new}"
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", what)[:200]


def generate_rows(run: Run, tok: Tokenizer, system: MTPSystem, split: str) -> tuple:
    """(tokens (N, T), loss_mask (N, T), taps): chat prompts of the task's `split`, each
    followed by the main model's continuation up to <eos>, the row's end or
    `data.distill_max_new` tokens; only the continuation is a target. With `data.cache_taps`,
    taps (N, T, L, D) are the main model's over each row, kept by the decoding passes that
    wrote it (zeros after the row's last token), else None."""
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
    taps = None
    dec = Decoder(system.with_max_len(t), tok.specials)  # rows end by t: caches of <= t
    sampling = Sampling(temperature=run.data.distill_temperature)
    # Calls of prompts of similar lengths: each prefill is as wide as its longest prompt.
    order = np.argsort([p.size for p in prompts], kind="stable")
    with progress(n, desc=f"self-distillation ({split})") as bar:
        for i in range(0, n, b):
            idx = order[i : i + b]
            batch = [prompts[j] for j in idx]
            new = t - max(p.size for p in batch)
            new = min(new, run.data.distill_max_new) if run.data.distill_max_new else new
            res = dec.generate(
                batch, mode="slow", max_new_tokens=new, sampling=sampling, seed=i,
                keep_taps=run.data.cache_taps,
            )  # fmt: skip
            if taps is None and res.taps is not None:
                taps = np.zeros((n, t, *res.taps.shape[2:]), res.taps.dtype)
            for j, (r, p) in enumerate(zip(idx, batch, strict=True)):
                out = res.row(j)
                rows[r, : p.size] = p
                rows[r, p.size : p.size + out.size] = out
                mask[r, p.size : p.size + out.size] = 1.0  # target x_t: emitted by the model
                if taps is not None:
                    taps[r, : p.size + out.size] = res.taps[j, : p.size + out.size]
            bar.update(len(batch))
    return rows, mask, taps


def forced_rows(run: Run, tok: Tokenizer) -> tuple:
    """(tokens (N, T), loss_mask (N, T)): `data.teacher_forced`'s train examples as chat
    prompts with their worked solutions as replies (`encode_plain_reply`), cut at T; only the
    reply is a target. They start after the corpus's own n prompts, so that the two sets do not
    share prompts when they name the same task."""
    task, n = parse_task_spec(run.data.teacher_forced)
    _, skip = parse_task_spec(run.data.corpus.removeprefix(PREFIX))
    t = run.data.seq_len
    rows = np.full((n, t), tok.specials.pad, np.int32)
    mask = np.zeros((n, t), np.float32)
    for i, ex in enumerate(task.examples("train", n, start=skip)):
        ids, reply = encode_plain_reply(tok, ex)
        ids = ids[:t]
        rows[i, : ids.size] = ids
        mask[i, reply : ids.size] = 1.0
    return rows, mask


def distill_arrays(run: Run, tok: Tokenizer, system: MTPSystem, workdir) -> dict[str, Arrays]:
    """`{split: arrays}` of the self-distillation rows (+ 'taps' with data.cache_taps),
    generated on first use and read back afterwards. With cached taps, rows are cut to their
    answers' windows (`generated_windows`; train windows to at most `data.window_len`). With
    `data.teacher_forced` the train split also holds those rows (`forced_rows`), and its
    'targets' are the main model's own greedy choice for each token (on its own rows, the
    token itself, up to float ties), from the cached taps (`main_choices`).

    The taps of the generated rows are those their decoding passes computed, stored beside
    the rows (each row's window, and with `drafter.context` its prompt too), so no second
    pass runs over them; rows stored without taps get a taps pass (`main_taps`)."""
    data_dir, name, t = Path(workdir) / "distill", dataset_name(run), run.data.seq_len
    if not is_prepared(name, data_dir, t):
        made = {s: generate_rows(run, tok, system, s) for s in SPLITS}
        for split, (_, mask, taps) in made.items():
            if taps is not None:
                first, ends = _window_bounds(mask)
                lo = np.zeros_like(first) if run.drafter.context else first
                write_taps(name, data_dir, split, taps, np.stack([lo, ends], 1))
        write_rows(name, data_dir, {s: m[:2] for s, m in made.items()})
    out = {
        split: dict(zip(("tokens", "loss_mask"), read_rows(name, data_dir, t, split), strict=True))
        for split in SPLITS
    }
    if not run.data.cache_taps:
        return out
    kept = {split: read_taps(name, data_dir, split) for split in SPLITS}
    if all(taps is not None for taps in kept.values()):
        for split in SPLITS:
            out[split]["taps"] = kept[split]
    else:
        rows = np.concatenate([out[split]["tokens"] for split in SPLITS])
        mask = np.concatenate([out[split]["loss_mask"] for split in SPLITS])
        taps, start = main_taps(system, rows, run.data.batch_size, _window_bounds(mask)[1]), 0
        for split in SPLITS:
            n = out[split]["tokens"].shape[0]
            out[split]["taps"], start = taps[start : start + n], start + n
    pad, past, train = tok.specials.pad, run.drafter.context, out["train"]
    if run.data.teacher_forced:
        f_rows, f_mask = forced_rows(run, tok)
        f_taps = main_taps(system, f_rows, run.data.batch_size, _window_bounds(f_mask)[1])
        train = {
            "tokens": np.concatenate([train["tokens"], f_rows]),
            "loss_mask": np.concatenate([train["loss_mask"], f_mask]),
            "taps": np.concatenate([train["taps"], f_taps]),
        }
    out["train"] = generated_windows(
        **train, pad=pad, past=past, width=run.data.window_len, pack=run.data.pack_windows
    )
    out["eval"] = generated_windows(**out["eval"], pad=pad, past=past)
    if run.data.teacher_forced:  # the choice for x_t is made at t - 1
        windows = out["train"]
        choices = main_choices(system, windows["taps"], run.data.batch_size)
        windows["targets"] = np.concatenate([windows["tokens"][:, :1], choices[:, :-1]], axis=1)
    return out


def _window_bounds(loss_mask) -> tuple[np.ndarray, np.ndarray]:
    """Each row's window (N,) starts and ends: from its last prompt token (the first position
    with a target after it) to its last target; (0, 0) for a row without targets."""
    has = (loss_mask > 0).any(1)
    first = np.where(has, np.argmax(loss_mask > 0, axis=1) - 1, 0)
    ends = np.where(has, loss_mask.shape[1] - np.argmax(loss_mask[:, ::-1] > 0, axis=1), 0)
    return first, ends


def _blank(rows: Arrays, lead: tuple, pad: int) -> Arrays:
    """For each per-row array (N, T, ...) an array of shape lead + (...): `pad` for tokens,
    zeros for the rest (what a window's padding holds)."""
    return {k: np.full((*lead, *a.shape[2:]), pad if k == "tokens" else 0, a.dtype)
            for k, a in rows.items()}  # fmt: skip


def generated_windows(
    tokens, loss_mask, taps, pad: int, past: bool = False, width: int = 0, pack: bool = False
) -> Arrays:
    """Rows (N, T), mask (N, T) and taps (N, T, L, D) cut to each row's window from its last
    prompt token (the first position with a target after it) to its end: (M, W) and
    (M, W, L, D), W the longest window. With `width` > 0 a longer window is cut into pieces
    of `width` (then M > N; a drafted pair whose position and target fall on two sides of a
    cut is lost). With `past` (a drafter that reads the context) also the taps
    before each window, right-aligned: 'past_taps' (M, P, L, D) and 'past_mask' (M, P), P
    the latest window start (`mtp.model.drafter.Past`). With `pack` (and `width`) the whole
    windows are laid end to end instead and the stream cut into rows of `width`, so no
    position is padding but the last row's tail; 'segments' (M, W) then numbers each
    position's window from 1 (0: padding), and a draft is scored only against targets of
    its own window (`mtp.train.losses`)."""
    if pack:
        return _packed_windows(tokens, loss_mask, taps, pad, width)
    first, ends = _window_bounds(loss_mask)
    pieces = [  # (row, start, end)
        (i, s, min(s + width, e) if width else e)
        for i, (a, e) in enumerate(zip(first, ends, strict=True))
        for s in (range(a, max(e, a + 1), width) if width else (a,))
    ]
    m = len(pieces)
    w, p = max(e - s for _, s, e in pieces), max(s for _, s, _ in pieces)
    cut = {"tokens": tokens, "loss_mask": loss_mask, "taps": taps}
    out = _blank(cut, (m, w), pad)
    if past:
        out["past_taps"] = np.zeros((m, p, *taps.shape[2:]), taps.dtype)
        out["past_mask"] = np.zeros((m, p), np.float32)
    for j, (i, s, e) in enumerate(pieces):
        for k, a in cut.items():
            out[k][j, : e - s] = a[i, s:e]
        if past:
            out["past_taps"][j, p - s :] = taps[i, :s]
            out["past_mask"][j, p - s :] = 1.0
    return out


def _packed_windows(tokens, loss_mask, taps, pad: int, width: int) -> Arrays:
    """`generated_windows` with `pack`: each row's window end to end, in rows of `width`."""
    first, ends = _window_bounds(loss_mask)
    keep = [i for i in range(len(first)) if ends[i] > first[i]]
    total = sum(int(ends[i] - first[i]) for i in keep)
    m = max(1, -(-total // width))
    cut = {"tokens": tokens, "loss_mask": loss_mask, "taps": taps}
    flat = _blank(cut, (m * width,), pad)
    flat["segments"] = np.zeros(m * width, np.int32)
    at = 0
    for seg, i in enumerate(keep, start=1):
        s, e = first[i], ends[i]
        for k, a in cut.items():
            flat[k][at : at + e - s] = a[i, s:e]
        flat["segments"][at : at + e - s] = seg
        at += e - s
    return {k: a.reshape(m, width, *a.shape[1:]) for k, a in flat.items()}


WIDTH_STEP = 64  # taps passes run as wide as their longest row, rounded up to this


def main_taps(system: MTPSystem, rows: np.ndarray, batch: int, ends=None) -> np.ndarray:
    """(N, T, L, D) taps of the main model over `rows` (N, T), as the drafter reads them, in
    the main model's compute dtype. `ends` (N,): the positions each row needs; the taps
    after them are left zero, not computed: rows run in batches of similar `ends`, each pass
    as wide as its longest row rounded up to `WIDTH_STEP` (a few compilations; a causal
    model's taps do not depend on the padding after them)."""
    graphdef, state = nnx.split(system)
    taps_of = jax.jit(lambda state, tokens_bt: nnx.merge(graphdef, state).main_taps(tokens_bt))
    n, t = rows.shape
    ends = np.full(n, t) if ends is None else np.asarray(ends)
    order = np.argsort(ends, kind="stable")
    out = None
    with progress(n, desc="caching taps") as bar:
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            w = min(t, -(-max(int(ends[idx].max()), 1) // WIDTH_STEP) * WIDTH_STEP)
            x = rows[np.concatenate([idx, np.repeat(idx[-1:], batch - idx.size)]), :w]
            taps = np.asarray(taps_of(state, jnp.asarray(x)))[: idx.size]
            if out is None:
                out = np.zeros((n, t, *taps.shape[2:]), taps.dtype)
            out[idx, :w] = taps
            bar.update(idx.size)
    return out


def main_choices(system: MTPSystem, taps: np.ndarray, batch: int) -> np.ndarray:
    """(N, T) greedy choices of the main model (the argmax of its logits over the whole
    vocabulary: the token it would write next) at each position of cached taps (N, T, L, D);
    only where they are read, not in the taps pass (its LM head there costs a third more)."""
    graphdef, state = nnx.split(system)

    @jax.jit
    def choices_of(state, taps_btld):
        logits_btv = nnx.merge(graphdef, state).main_logits_from_taps(taps_btld, full_vocab=True)
        return logits_btv.argmax(-1).astype(jnp.int32)

    parts = []
    with progress(taps.shape[0], desc="main model's choices") as bar:
        for i in range(0, taps.shape[0], batch):
            x = taps[i : i + batch]  # the last batch padded: one compilation
            x = np.concatenate([x, np.repeat(x[-1:], batch - x.shape[0], 0)])
            parts.append(np.asarray(choices_of(state, jnp.asarray(x))))
            bar.update(min(batch, taps.shape[0] - i))
    return np.concatenate(parts)[: taps.shape[0]]
