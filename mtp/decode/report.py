"""Text and statistics of one prompt decoded in several modes (`mtp.run --mode=decode`).

    python -m mtp.run --workdir=runs/tiny --mode=decode --prompt="def main(" \
        --decode_modes=slow,speculative,fast --max_new_tokens=128

Each mode runs twice: the first call compiles, the second is timed, so the
table's wall time and tokens/s are those of a warm decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtp.data.format import encode_prompt, encode_question
from mtp.decode.engine import Decoder
from mtp.decode.modes import MODES, Adaptive, Speculative
from mtp.decode.result import DecodeResult
from mtp.decode.sampling import Sampling
from mtp.decode.thinking import think_then_answer
from mtp.errors import DecodeError


def _check_modes(modes: Sequence[str]) -> list[str]:
    modes = [m.strip() for m in modes if m.strip()]
    if not modes:
        raise DecodeError(f"no decode mode given; allowed: {', '.join(MODES)}")
    for m in modes:
        if m not in MODES:
            raise DecodeError(f"decode mode {m!r} is unknown; allowed: {', '.join(MODES)}")
    return modes


def _row(res: DecodeResult, compile_s: float) -> str:
    st = res.stats
    spec = res.mode == "speculative"
    acc = " ".join(f"{a:.2f}" for a in st["accept_rate"]) if spec else "-"
    mean_acc = f"{st['mean_accepted']:.2f}" if spec else "-"
    return (
        f"| {res.mode} | {st['tokens']} | {st['main_passes']} | {st['tokens_per_pass']:.2f} "
        f"| {mean_acc} | {acc} | {1e3 * st['wall_s']:.1f} | {st['tokens_per_s']:.0f} "
        f"| {compile_s:.2f} |"
    )


def decode_report(
    system,
    tokenizer,
    prompt: str,
    modes: Sequence[str] = ("slow", "speculative", "fast"),
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    think_budget: int = 0,
    chat: bool = True,
    tau: float = 0.9,
    confidence: str = "prob",
    tree_nodes: int = 0,
    tree_beams: int = 4,
) -> str:
    """Decodes `<bos> prompt` in each mode; returns the texts and a markdown table.

    Special strings in the prompt ("<think>") become their tokens, so a prompt
    can open a thinking span. With `chat` and a tokenizer that has a chat template,
    the prompt is the user's message and the model writes the assistant's reply.
    With `think_budget` > 0, the `think` row is a thought (fast, from `encode_prompt`)
    within that many main passes, then a slow answer (`think_then_answer`). The
    `adaptive` row keeps drafts while their `confidence` is >= `tau`; with `tree_nodes` > 0
    the `speculative` row verifies a draft tree of that many nodes (`tree_beams` beams). Raises
    DecodeError (a UserError) on an empty prompt, an unknown mode or a prompt that does
    not fit the cache.
    """
    if not prompt:
        raise DecodeError("--prompt is empty; give the text to continue, e.g. --prompt='def main('")
    modes = _check_modes(modes)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    ids = encode_question(tokenizer, prompt, chat=chat)
    dec = Decoder(system, tokenizer.specials)
    chat = chat and tokenizer.chat_template is not None
    shown = tokenizer.decode(ids, skip_special=False) if chat else prompt
    lines = [f"prompt: {prompt!r}  (k={dec.k}, {sampling})", ""]
    rows, results = [], {}
    for mode in modes:
        if mode == "think" and think_budget:
            th = think_then_answer(
                dec, [encode_prompt(tokenizer, prompt)], think_budget=think_budget,
                answer_max_tokens=max_new_tokens, sampling=sampling, seed=seed,
            )  # fmt: skip
            text = tokenizer.decode(np.concatenate([th.thoughts[0], th.answer.row(0)]), False)
            how = "forced" if th.forced[0] else "chosen"
            n = th.thoughts[0].size - 1
            lines += [
                f"### think, budget {think_budget} passes: {n} thought tokens, {how} </think>, "
                f"{int(th.passes[0])} main passes",
                prompt + "<think>" + text,
                "",
            ]
            continue
        obj = {
            "adaptive": Adaptive(tau=tau, confidence=confidence),
            "speculative": Speculative(tree_nodes=tree_nodes, tree_beams=tree_beams),
        }.get(mode, mode)
        kw = dict(mode=obj, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed)
        first = dec.generate([ids], **kw)
        res = dec.generate([ids], **kw) if first.compiled else first  # timed warm
        results[mode] = res
        tree = isinstance(obj, Speculative) and obj.tree_nodes
        tree = f" (a tree of {obj.tree_nodes} nodes, {obj.tree_beams} beams)" if tree else ""
        lines += [f"### {mode}{tree}", shown + res.texts(tokenizer)[0], ""]
        if mode == "adaptive":
            hist = res.stats["tokens_per_pass_hist"]
            lines += [f"passes by tokens per pass ({confidence} >= {tau}): {hist}", ""]
        rows.append(_row(res, max(first.wall_s - res.wall_s, 0.0)))
    if rows:
        lines += [
            "| mode | tokens | main passes | tokens/pass | mean accepted | acceptance by offset "
            "| wall ms | tokens/s | compile s |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    if sampling.greedy and {"slow", "speculative"} <= results.keys():
        same = np.array_equal(results["slow"].row(0), results["speculative"].row(0))
        lines += ["", f"speculative greedy identical to slow: {'yes' if same else 'NO'}"]
    return "\n".join(lines)
