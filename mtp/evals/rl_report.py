r"""Accuracy against main passes on held-out problems: slow, fast, adaptive, learned emission.

    python -m mtp.evals.rl_report --workdir=runs/rl_arith [--n=256] [--budgets=2,4,8,0] \
        [--taus=0.5,0.7,0.9,0.95,0.99] [--also=runs/rl_emit]

For a pipeline run directory (`mtp.programs.rl`), decodes `n` held-out
problems of the run's task greedily with each system (the answer always in
slow mode):

    slow                 warm-up checkpoint, thought in slow mode (1 token per pass)
    fast/supervised      warm-up checkpoint, thought in fast mode (1 + k per pass)
    fast/rl_drafter      after RL of the drafter only (main frozen)
    fast/rl_main         after RL of the main model only (if the run has it)
    fast/rl_both         after joint RL
    fast/CKPT, drafts j  each of those checkpoints keeping only j < k drafts per pass
                         (the fixed-length baseline; no budget)
    adaptive/CKPT        each of those checkpoints in adaptive mode, one row per tau
                         (keep drafts while the drafter's probability is >= tau; no budget)
    learned/CKPT         a drafter with a keep head (`drafter.emission`), its learned
                         decisions, at urgency 0 and at urgency 1 (no budget)

fast and slow run at each thought budget (main passes allowed for the
thought; 0 = no budget). `--also` adds the RL arms of other run directories
started from the same warm-up (e.g. a learned-emission run), named DIR/arm.

Writes WORKDIR/rl_report.{md,json,png}: a table of accuracy, main passes per
answer (thought + answer), tokens per pass, how often the budget cut the
thought and, for the drafting modes, the share of answers whose every draft is
the main model's own greedy token with the accuracy of those and of the rest;
and a plot of accuracy against main passes with the Pareto front. It ends with
the checks of the aims: the best adaptive point after joint RL within 5 points
of slow (no budget) at <= 50% of its passes and ahead of fast mode at equal or
fewer passes; fast after joint RL ahead of drafter-only RL and of the
supervised drafter at the same budget; learned emission spending fewer passes
at urgency 1 than at 0.
"""

from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags, logging

from mtp import checkpoint as ckpt
from mtp.data.task_data import parse_task_spec
from mtp.data.tokenizer import tokenizer_of
from mtp.decode.modes import Adaptive, Fast
from mtp.errors import UserError
from mtp.evals.task_accuracy import TaskAccuracy
from mtp.metrics import format_table
from mtp.rl.learner import load_rl_system

_WORKDIR = flags.DEFINE_string("workdir", None, "Pipeline run directory (warmup/, rl_*/).")
_N = flags.DEFINE_integer("n", 256, "Held-out problems.")
_BUDGETS = flags.DEFINE_list("budgets", "2,4,6,8,10,12,16,24,32,48,0", "Thought pass budgets.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Problems decoded per call.")
_TAUS = flags.DEFINE_list("taus", "0.5,0.7,0.9,0.95,0.99", "Adaptive thresholds (empty: none).")
_ALSO = flags.DEFINE_list("also", [], "More run directories from the same warm-up: their arms.")
LEARNED = Adaptive(tau=0.5, confidence="learned")  # greedy decisions: keep iff p(keep) >= 0.5


def checkpoints(workdir: Path, prefix: str = ""):
    """(name, loader, learned) of the RL arms of a run directory, in a fixed order; learned:
    the arm trained learned emission (`rl.thought_mode='learned'`)."""
    learned = ckpt.read_run(workdir).rl.thought_mode == "learned"
    return [
        (f"{prefix}rl_{arm}", lambda a=arm: load_rl_system(workdir / f"rl_{a}")[0], learned)
        for arm in ("drafter", "main", "both")
        if (workdir / f"rl_{arm}" / "checkpoints").exists()
    ]


def systems(workdir: Path, taus=(), also=(), k: int = 0):
    """(name, loader, [(thought mode, urgency, budgets or None for the given ones)]) for every
    system the run directory (and the `also` ones) holds."""
    warm = lambda: ckpt.load_system(workdir / "warmup")[0]
    ckpts = [("supervised", warm, False), *checkpoints(workdir)]
    for other in also:
        ckpts += checkpoints(Path(other), f"{Path(other).name}/")
    out = [("slow", warm, [("slow", None, None)])]
    for name, load, learned in ckpts:
        evals = [("fast", None, None)] + [(Fast(drafts=j), None, (0,)) for j in range(1, k)]
        evals += [(Adaptive(tau=t), None, (0,)) for t in taus]
        out.append((name, load, evals + [(LEARNED, u, (0,)) for u in (0.0, 1.0) if learned]))
    return out


def label(ckpt_name: str, mode, urgency) -> str:
    if mode == "slow":
        return "slow"
    if mode == "fast" or isinstance(mode, Fast):
        return f"fast/{ckpt_name}"
    if mode.confidence == "learned":
        return f"learned/{ckpt_name}"
    return f"adaptive/{ckpt_name}"


def measure(workdir, n: int, budgets: list[int], batch_size: int = 64, taus=(), also=(),
            log=print) -> list[dict]:  # fmt: skip
    workdir = Path(workdir)
    run = ckpt.read_run(workdir)
    if run.rl is None:
        raise UserError(f"{workdir}: the run's config has no 'rl' section")
    task, _ = parse_task_spec(run.rl.task)
    tok = tokenizer_of(run)
    rows = []
    for name, load, evals in systems(workdir, taus, also, run.drafter.k if taus else 0):
        system = load()
        for mode, urgency, at in evals:
            for budget in budgets if at is None else at:
                ev = TaskAccuracy(
                    task, tok, n, thought_mode=mode, think_budget=budget, urgency=urgency,
                    answer_max_tokens=run.rl.answer_max_tokens, batch_size=batch_size,
                )  # fmt: skip
                r = dict(ev.run(system))
                row = {"system": label(name, mode, urgency), "budget": budget}
                if isinstance(mode, Adaptive) and mode is not LEARNED:
                    row["tau"] = mode.tau
                if isinstance(mode, Fast):
                    row["drafts"] = mode.drafts
                if urgency is not None:
                    row["urgency"] = urgency
                rows.append(row | r)
                log(f"{row['system']:24s} budget {budget or 'none':>4} tau {row.get('tau', '-')}"
                    f" drafts {row.get('drafts', '-')}"
                    f" urgency {row.get('urgency', '-')}: accuracy {r['accuracy']:.3f}, "
                    f"passes {r['passes']:.1f}")  # fmt: skip
    return rows


def check_adaptive(rows: list[dict], slow: dict) -> list[str]:
    """Adaptive after joint RL within 5 points of slow at <= 50% of its passes, and ahead of
    fast after joint RL at equal or fewer passes: stated with the numbers, met or not."""
    adaptive = [r for r in rows if r["system"] == "adaptive/rl_both"]
    if not adaptive:
        return []
    cheap = [r for r in adaptive if r["passes"] <= 0.5 * slow["passes"]]
    if not cheap:
        return [f"check: no adaptive/rl_both tau spends <= 50% of slow's {slow['passes']:.1f}"]
    best = max(cheap, key=lambda r: r["accuracy"])
    gap = 100 * (slow["accuracy"] - best["accuracy"])
    lines = [
        f"check: adaptive/rl_both (tau {best['tau']}) {100 * best['accuracy']:.1f}% at "
        f"{best['passes']:.1f} passes ({100 * best['passes'] / slow['passes']:.0f}% of slow's "
        f"{slow['passes']:.1f}), slow {100 * slow['accuracy']:.1f}%: {gap:.1f} points behind -> "
        f"{'MET' if gap <= 5 else 'NOT met'} (aim: <= 5 points at <= 50% of the passes)"
    ]
    fast = [r for r in rows if r["system"] == "fast/rl_both" and r["passes"] >= best["passes"]]
    if not fast:
        return lines + ["check: no fast/rl_both row spends as many passes as adaptive's best"]
    top = max(fast, key=lambda r: r["accuracy"])
    ahead = best["accuracy"] > top["accuracy"]
    kept = f"{top['drafts']} drafts/pass" if "drafts" in top else "all drafts"
    lines.append(
        f"check: adaptive/rl_both {100 * best['accuracy']:.1f}% vs the best fast/rl_both at "
        f"equal or more passes ({kept}: {100 * top['accuracy']:.1f}% at {top['passes']:.1f}) "
        f"-> {'ahead' if ahead else 'NOT ahead'}"
    )
    return lines


def check_urgency(rows: list[dict]) -> list[str]:
    """Learned emission: fewer main passes at urgency 1 than at urgency 0 (by at least 2%: less
    is within the noise of 512 problems' pass counts), per checkpoint."""
    lines = []
    for name in dict.fromkeys(r["system"] for r in rows if r["system"].startswith("learned/")):
        at = {r["urgency"]: r for r in rows if r["system"] == name}
        if 0.0 in at and 1.0 in at:
            calm, urgent = at[0.0], at[1.0]
            fewer = urgent["passes"] < 0.98 * calm["passes"]
            lines.append(
                f"check: {name} at urgency 0 {100 * calm['accuracy']:.1f}% at "
                f"{calm['passes']:.2f} passes, at urgency 1 {100 * urgent['accuracy']:.1f}% at "
                f"{urgent['passes']:.2f} -> {'fewer' if fewer else 'NOT fewer (by >= 2%)'} "
                "passes when urgent"
            )
    return lines


def check(rows: list[dict], k: int) -> list[str]:
    """The aims (fast after joint RL within 5 points of slow at <= 40% of its passes; adaptive
    and learned emission: `check_adaptive`, `check_urgency`), stated with the measured numbers
    (met or not)."""
    get = lambda s, b: next((r for r in rows if r["system"] == s and r["budget"] == b), None)
    slow = get("slow", 0)
    lines = []
    joint = [r for r in rows if r["system"] == "fast/rl_both"]
    if slow is None or not joint:
        return ["check: needs 'slow' at budget 0 and 'fast/rl_both' rows"]
    # the best joint-RL point that spends at most 40% of slow's passes
    cheap = [r for r in joint if r["passes"] <= 0.4 * slow["passes"]]
    best = max(cheap, key=lambda r: r["accuracy"]) if cheap else None
    if best is None:
        lines.append(f"check: no fast/rl_both budget spends <= 40% of slow's {slow['passes']:.1f}")
        return lines
    if slow["accuracy"] < 0.2:
        lines.append(f"note: slow is at {100 * slow['accuracy']:.1f}%: the warm-up has not learnt "
                     "the task, so the comparison below says little")  # fmt: skip
    gap = 100 * (slow["accuracy"] - best["accuracy"])
    share = best["passes"] / slow["passes"]
    lines.append(
        f"check (k={k}): slow {100 * slow['accuracy']:.1f}% at {slow['passes']:.1f} passes; "
        f"fast/rl_both (budget {best['budget'] or 'none'}) {100 * best['accuracy']:.1f}% at "
        f"{best['passes']:.1f} passes ({100 * share:.0f}% of slow's): "
        f"{gap:.1f} points behind -> {'MET' if gap <= 5 else 'NOT met'} (aim: <= 5 points)"
    )
    for other in ("fast/rl_drafter", "fast/supervised"):
        o = get(other, best["budget"])
        if o is not None:
            ahead = best["accuracy"] > o["accuracy"]
            lines.append(
                f"check: fast/rl_both {100 * best['accuracy']:.1f}% vs {other} "
                f"{100 * o['accuracy']:.1f}% at the same budget -> "
                f"{'ahead' if ahead else 'NOT ahead'}"
            )
    return lines + check_adaptive(rows, slow) + check_urgency(rows)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (passes, accuracy) points no other point beats on both (fewer passes, higher
    accuracy), by passes."""
    front, best = [], -1.0
    for p, a in sorted(points, key=lambda x: (x[0], -x[1])):
        if a > best:
            front.append((p, a))
            best = a
    return front


# drafting modes only: answers whose every draft is the main model's own greedy token, and
# the accuracy of those and of the rest
AGREE = ("drafts_agree", "accuracy_if_agree", "accuracy_if_not")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["system"] for r in rows):
        pts = sorted((r["passes"], r["accuracy"]) for r in rows if r["system"] == name)
        ax.plot([p for p, _ in pts], [a for _, a in pts], marker="o", label=name, alpha=0.8)
    front = pareto([(r["passes"], r["accuracy"]) for r in rows])
    ax.step([p for p, _ in front], [a for _, a in front], where="post", color="k", lw=2,
            alpha=0.35, label="Pareto front")  # fmt: skip
    ax.set_xlabel("main passes per answer (thought + answer)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title, fontsize="medium", wrap=True)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(workdir, n: int = 256, budgets=(0,), batch_size: int = 64, taus=(), also=()) -> str:
    workdir = Path(workdir)
    run = ckpt.read_run(workdir)
    budgets = [int(b) for b in budgets]
    rows = measure(workdir, n, budgets, batch_size, [float(t) for t in taus], also)
    dash = lambda r, key: r.get(key, "-")
    table = format_table(
        [[r["system"], r["budget"] or "none", dash(r, "drafts"), dash(r, "tau"), dash(r, "urgency"),
          r["accuracy"], r["passes"], r["thought_passes"], r["tokens_per_pass"], r["forced_close"]]
         + [r.get(c, float("nan")) for c in AGREE] for r in rows],
        ["system", "thought budget", "drafts/pass", "tau", "urgency", "accuracy", "main passes",
         "thought passes", "tokens/pass", "budget hit", "drafts = main's", "acc. if so",
         "acc. if not"],
    )  # fmt: skip
    title = f"{run.rl.task}, k={run.drafter.k}, {n} held-out problems, greedy"
    text = f"## RL report: {title}\n\n{table}\n\n" + "\n".join(check(rows, run.drafter.k)) + "\n"
    (workdir / "rl_report.md").write_text(text)
    (workdir / "rl_report.json").write_text(json.dumps(rows, indent=2))
    plot(rows, workdir / "rl_report.png", title)
    return text


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        print(report(_WORKDIR.value, _N.value, _BUDGETS.value, _BATCH.value, _TAUS.value,
                     _ALSO.value))  # fmt: skip
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
