r"""The pause-token report: accuracy against pauses, adaptive vs fixed, urgency, tokens/pass.

    python -m mtp.evals.pause_report --workdir=runs/pause     # again, from a finished run

Decodes `pause.eval_prompts` held-out problems greedily with each model of a
pause run (`mtp.programs.pause`) and writes WORKDIR/pause_report.{md,json}:

1. accuracy against M fixed pauses for the plain and the pause-trained model;
2. the confidence (or entropy) rule at each threshold, and the learned model
   at urgency 0 and 1, each beside the best fixed M of the pause-trained model
   that spends no more passes on average;
3. tokens per main pass: `fast` (1 + k) and `slow` (1) from the decoding
   engine on one prompt, paused (answer tokens / (answer tokens + pauses)).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mtp import checkpoint as ckpt
from mtp.config import Run
from mtp.data.format import answer_text, encode_prompt
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import Tokenizer, tokenizer_of
from mtp.decode.engine import Decoder
from mtp.decode.modes import Pause
from mtp.metrics import format_table
from mtp.rl.learner import load_rl_system


class PauseAccuracy:
    """Evaluator: greedy decodes of held-out problems under one pause policy.

    `run(system, policy, urgency)` yields accuracy, mean pauses, mean main
    passes per answer and answer tokens per pass.
    """

    def __init__(self, task, tok: Tokenizer, n: int, batch_size: int = 128):
        self.task, self.tok = task, tok
        self.examples = task.examples("eval", n)
        self.prompt_ids = [encode_prompt(tok, ex.prompt, ex.thought) for ex in self.examples]
        self.batch_size = batch_size

    def run(self, system, policy: Pause, urgency: float = 0.0):
        dec = Decoder(system, self.tok.specials)
        scores, pauses, passes, answer = [], [], [], []
        bs = self.batch_size
        for i in range(0, len(self.prompt_ids), bs):
            chunk = self.prompt_ids[i : i + bs]
            padded = chunk + [chunk[-1]] * (bs - len(chunk))  # one shape: one compile
            res = dec.generate(
                padded, mode=policy, max_new_tokens=self.task.max_answer_len + 1,
                urgency_b=urgency,
            )  # fmt: skip
            for j in range(len(chunk)):
                ex = self.examples[i + j]
                scores.append(self.task.score(ex.prompt, answer_text(self.tok, res.answer_row(j))))
            n = len(chunk)
            pauses.append(res.pauses[:n])
            passes.append(res.passes[:n])
            answer.append(res.lengths[:n] - res.pauses[:n] + res.prompt_pauses[:n])
        pauses, passes, answer = (np.concatenate(x) for x in (pauses, passes, answer))
        yield "accuracy", float(np.mean(scores))
        yield "pauses", float(pauses.mean())
        yield "passes", float(passes.mean())
        yield "tokens_per_pass", float(answer.sum() / max(passes.sum(), 1))


def _best_fixed(fixed: dict, budget: float):
    """(M, accuracy) of the most accurate fixed M spending <= `budget` pauses, or None."""
    ok = [(acc, -m) for m, acc in fixed.items() if m <= budget + 1e-9]
    return None if not ok else (-max(ok)[1], max(ok)[0])


def findings(fixed: dict, adaptive: list[dict]) -> list[str]:
    """The report's answers (do pauses help, does a rule beat fixed M, does urgency cut
    pauses), computed from its own numbers."""
    lines = []
    for name, label in (("paused", "pause-trained"), ("plain", "plain")):
        acc = fixed[name]
        if 0 not in acc or len(acc) < 2:
            continue
        peak = max((m for m in acc if m), key=lambda m: acc[m])
        after = [acc[m] for m in acc if m > peak]
        lines.append(
            f"{label}: M=0 {acc[0]:.3f}, best M={peak} {acc[peak]:.3f} "
            f"({100 * (acc[peak] - acc[0]):+.1f} points)"
            + (f", largest M {acc[max(acc)]:.3f}" if after else "")
            + (": pauses help" if acc[peak] > acc[0] else ": pauses do not help")
        )
    rules = [a for a in adaptive if a["model"] == "paused"]
    if rules:
        beaten = [a for a in rules if a["best_fixed_at_or_below"] is not None
                  and a["accuracy"] > a["best_fixed_at_or_below"][1]]  # fmt: skip
        lines.append(f"adaptive rule: {len(beaten)} of {len(rules)} thresholds beat the best "
                     "fixed M at no more mean pauses")  # fmt: skip
    learned = {a["urgency"]: a["pauses"] for a in adaptive if a["model"] == "learned"}
    if {0.0, 1.0} <= set(learned):
        fewer = learned[1.0] < learned[0.0]
        verdict = "fewer" if fewer else "NOT fewer"
        lines.append(f"learned: urgency 1 spends {learned[1.0]:.2f} pauses, urgency 0 "
                     f"{learned[0.0]:.2f}: {verdict} at urgency 1")  # fmt: skip
    return lines


def _engine_tokens_per_pass(system, tok: Tokenizer, head) -> dict:
    """fast and slow tokens per main pass, measured by the decoding engine on one prompt.

    EOS is not a stop token here (an answer is a token or two, and a pass cut
    short by EOS would understate fast mode), so each mode fills 8 passes.
    """
    dec = Decoder(system, tok.specials)
    n = 8 * (dec.k + 1)
    return {
        mode: dec.generate([head], mode=mode, max_new_tokens=n, stop_id=-1).stats["tokens_per_pass"]
        for mode in ("slow", "fast")
    }


def load_systems(workdir) -> dict:
    """The three models of a pause run directory, by name."""
    workdir = Path(workdir)
    out = {name: ckpt.load_system(workdir / name)[0] for name in ("plain", "paused")}
    out["learned"] = load_rl_system(workdir / "learned", workdir / "learned_emit", "both")[0]
    return out


def write_report(run: Run, workdir, tok: Tokenizer) -> dict:
    """Decodes with every model of the run and writes pause_report.{md,json}; returns the rows."""
    pause, workdir = run.pause, Path(workdir)
    task, _ = parse_task_spec(pause.task)
    ev = PauseAccuracy(task, tok, pause.eval_prompts)
    decs = load_systems(workdir)
    out = {"task": pause.task, "eval_prompts": pause.eval_prompts, "fixed": {}, "adaptive": []}
    fixed_rows, fixed = [], {"plain": {}, "paused": {}}
    for m in pause.eval_ms:
        row = [m]
        for name in ("plain", "paused"):
            r = dict(ev.run(decs[name], Pause("fixed", m=m)))
            fixed[name][m] = r["accuracy"]
            out["fixed"].setdefault(name, {})[m] = r
            row.append(r["accuracy"])
        fixed_rows.append(row + [1 / (1 + m)])

    adaptive_rows = []

    def add(label, model, policy, urgency=0.0):
        r = dict(ev.run(decs[model], policy, urgency))
        best = _best_fixed(fixed["paused"], r["pauses"])
        out["adaptive"].append({"policy": label, "model": model, "urgency": urgency} | r
                               | {"best_fixed_at_or_below": best})  # fmt: skip
        adaptive_rows.append([label, model, r["accuracy"], r["pauses"], r["passes"],
                              "-" if best is None else f"M={best[0]}: {best[1]:.3f}"])  # fmt: skip

    for thr in pause.thresholds:
        add(f"{pause.rule} < {thr}" if pause.rule == "confidence" else f"entropy > {thr}", "paused",
            Pause(pause.rule, threshold=thr, cap=pause.cap))  # fmt: skip
    for u in (0.0, 1.0):
        add(f"learned, urgency {u:g}", "learned", Pause("learned", cap=pause.cap), u)

    tpp = _engine_tokens_per_pass(decs["paused"], tok, ev.prompt_ids[0])
    tpp_rows = []
    if "fast" in tpp:
        tpp_rows.append([f"fast (1 + k, k={run.drafter.k})", tpp["fast"]])
    if "slow" in tpp:
        tpp_rows.append(["slow (1)", tpp["slow"]])
    for m in pause.eval_ms:
        tpp_rows.append([f"paused, M={m} (1 / (1 + M) per answer token)",
                         out["fixed"]["paused"][m]["tokens_per_pass"]])  # fmt: skip
    out["tokens_per_pass"] = {r[0]: r[1] for r in tpp_rows}
    out["findings"] = findings(fixed, out["adaptive"])

    text = (
        f"# Pause tokens on `{pause.task}` ({pause.eval_prompts} held-out problems, greedy)\n\n"
        "## Accuracy against M fixed pauses before the answer\n\n"
        + format_table(fixed_rows, ["M", "plain model", "pause-trained", "tokens / pass"])
        + "\n\n## Adaptive pausing against fixed M (pause-trained model)\n\n"
        + format_table(
            adaptive_rows,
            [
                "policy",
                "model",
                "accuracy",
                "mean pauses",
                "mean passes",
                "best fixed M with <= pauses",
            ],
        )  # fmt: skip
        + "\n\n## Tokens per main pass\n\n"
        + format_table(tpp_rows, ["mode", "tokens / main pass (measured)"])
        + "\n\n## Findings\n\n"
        + "".join(f"- {line}\n" for line in out["findings"])
    )
    (workdir / "pause_report.md").write_text(text)
    (workdir / "pause_report.json").write_text(json.dumps(out, indent=2, default=str))
    print(text)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="The report of a finished pause run.")
    parser.add_argument("--workdir", required=True)
    workdir = parser.parse_args(argv).workdir
    run = ckpt.read_run(workdir)
    write_report(run, workdir, tokenizer_of(run))


if __name__ == "__main__":
    main()
