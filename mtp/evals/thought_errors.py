r"""Where greedy thoughts first depart from the task's worked thought, and who wrote the error.

    python -m mtp.evals.thought_errors --workdir=runs/rl_mult/warmup --mode=fast [--n=512]
    python -m mtp.evals.thought_errors --workdir=runs/rl_mult/rl_both

`workdir` is a warm-up or an RL arm directory of a pipeline run
(`mtp.programs.rl`); the task is the run's `rl.task`. Decodes `n` held-out
problems greedily (thought in `mode`, no budget, answer in slow mode) and, for
each thought that is not the task's worked thought token for token, finds the
first wrong token: the offset of the pass slot that emitted it (0: the main
model's own token; j: the drafter's j-th draft) and the step of the thought it
falls in (the thought's space-separated steps: for multiplication, the partial
products, then the sums). Prints both as tables, with the accuracy of answers
after an exact thought and after a wrong one.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
from pathlib import Path

import numpy as np

from mtp import checkpoint as ckpt
from mtp.data.format import answer_text, encode_prompt
from mtp.data.task_data import parse_task_spec
from mtp.data.tasks import Example, Task
from mtp.data.tokenizer import Tokenizer, tokenizer_of
from mtp.decode.engine import Decoder
from mtp.decode.thinking import Thought, think_then_answer
from mtp.errors import UserError
from mtp.metrics import format_table
from mtp.rl.learner import load_rl_system


@dataclasses.dataclass
class ThoughtErrors:
    n: int
    exact: int  # thoughts equal to the worked one, </think> included
    accuracy_if_exact: float  # NaN where there are none
    accuracy_if_not: float
    by_offset: collections.Counter  # offset in its pass of the first wrong token -> count
    by_step: collections.Counter  # 1-based step of the thought it falls in (-1: after it)


def first_errors(th: Thought, tok: Tokenizer, task: Task, examples: list[Example]):
    """ThoughtErrors of the thoughts in `th` (of `examples`) against their worked thoughts."""
    close = tok.specials.think_close
    scores, exact = np.zeros(len(examples)), np.zeros(len(examples), bool)
    by_offset, by_step = collections.Counter(), collections.Counter()
    for i, ex in enumerate(examples):
        scores[i] = task.score(ex.prompt, answer_text(tok, th.answer.row(i)))
        want = np.append(tok.encode(ex.thought), close)
        n1 = int(th.thought.lengths[i])
        got = np.concatenate([th.thoughts[i], th.answer.row(i)])[: want.size]
        offset = np.concatenate([th.thought.offset[i, :n1], np.zeros(got.size, np.int32)])
        wrong = np.flatnonzero(got != want[: got.size])
        if not wrong.size and got.size == want.size:
            exact[i] = True
            continue
        j = int(wrong[0]) if wrong.size else got.size  # the row ran out: cut by the cache
        if j < offset.size:
            by_offset[int(offset[j])] += 1
        by_step[ex.thought[:j].count(" ") + 1 if j < len(ex.thought) else -1] += 1
    share = lambda x: float(x.mean()) if x.size else float("nan")
    return ThoughtErrors(
        len(examples), int(exact.sum()), share(scores[exact]), share(scores[~exact]),
        by_offset, by_step,
    )  # fmt: skip


def greedy_thoughts(system, tok: Tokenizer, task: Task, examples: list[Example], mode: str):
    """Greedy thoughts in `mode` (no budget) and slow answers of `examples`."""
    prompt_ids = [encode_prompt(tok, ex.prompt) for ex in examples]
    dec = Decoder(system, tok.specials)
    return think_then_answer(dec, prompt_ids, thought_mode=mode,
                             answer_max_tokens=task.max_answer_len + 1)  # fmt: skip


def load(workdir: Path):
    """(system, task, tokenizer) of a warm-up or RL arm directory."""
    run = ckpt.read_run(workdir)
    if run.rl is None:
        raise UserError(f"{workdir}: the run's config has no 'rl' section (no task to check)")
    arm = workdir.name.startswith("rl_")
    system = load_rl_system(workdir)[0] if arm else ckpt.load_system(workdir)[0]
    return system, parse_task_spec(run.rl.task)[0], tokenizer_of(run)


def report(workdir, mode: str = "fast", n: int = 512) -> str:
    workdir = Path(workdir)
    system, task, tok = load(workdir)
    examples = task.examples("eval", n)
    e = first_errors(greedy_thoughts(system, tok, task, examples, mode), tok, task, examples)
    counts = {ex.thought.count(" ") + 1 for ex in examples}  # steps per thought
    of = f" of {counts.pop()}" if len(counts) == 1 else ""  # "2 of 3" where all have 3
    wrong = e.n - e.exact
    who = lambda o: "main" if o == 0 else f"draft {o}"
    where = lambda s: f"{s}{of}" if s > 0 else "after the thought"
    return "\n".join([
        f"## First wrong thought token: {workdir}, {task.name}, {mode} mode, {n} held-out, greedy",
        "",
        f"exact thoughts {e.exact} / {e.n}: accuracy {e.accuracy_if_exact:.3f} after an exact "
        f"thought, {e.accuracy_if_not:.3f} after a wrong one",
        "",
        format_table([[who(o), c, c / max(wrong, 1)] for o, c in sorted(e.by_offset.items())],
                     ["written by", "first errors", "share"]),
        "",
        format_table([[where(s), c, c / max(wrong, 1)] for s, c in
                      sorted(e.by_step.items(), key=lambda kv: (kv[0] < 0, kv[0]))],
                     ["thought step", "first errors", "share"]),
    ])  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="A pipeline's warmup/ or rl_<arm>/.")
    parser.add_argument("--mode", choices=("fast", "slow"), default="fast", help="Thought mode.")
    parser.add_argument("--n", type=int, default=512, help="Held-out problems.")
    args = parser.parse_args(argv)
    try:
        print(report(args.workdir, args.mode, args.n))
    except UserError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
