"""First wrong thought token: found at the right place, credited to the right pass slot."""

import numpy as np

from mtp.data.tasks import make_task
from mtp.data.tokenizer import EOS_ID, PAD_ID, THINK_CLOSE_ID, ByteTokenizer
from mtp.evals.thought_errors import first_errors
from mtp.train.rl_rollout import Rollouts, prompt_ids

K = 2


class ScriptedRoll:
    """Stands in for ThinkRollout: returns given thoughts as fast-mode rows (passes of K + 1)."""

    def __init__(self, thoughts, answers):
        self.tok, self.thoughts, self.answers = ByteTokenizer(), thoughts, answers

    def __call__(self, prompts, **kw):
        rows, offs = [], []
        for p, t, a in zip(prompts, self.thoughts, self.answers, strict=True):
            head = prompt_ids(self.tok, p)
            gen = np.concatenate([self.tok.encode(t), [THINK_CLOSE_ID], self.tok.encode(a),
                                  [EOS_ID]])  # fmt: skip
            rows.append(np.concatenate([head, gen]))
            offs.append(np.concatenate([np.zeros(head.size), np.arange(gen.size) % (K + 1)]))
        b, l = len(rows), max(r.size for r in rows)
        tokens, offset = np.full((b, l), PAD_ID, np.int32), np.zeros((b, l), np.int32)
        for i, (r, o) in enumerate(zip(rows, offs, strict=True)):
            tokens[i, : r.size], offset[i, : o.size] = r, o
        z = np.zeros(b, np.int32)
        return Rollouts(tokens, offset, offset * 0, (tokens != PAD_ID).astype(np.float32),
                        list(prompts), list(self.answers), z, z, z, z.astype(bool))  # fmt: skip


def test_first_wrong_token_offset_and_step():
    task = make_task("multiplication", digits=2, multiplier_digits=2)
    exs = task.examples("eval", 3)
    right = [ex.thought for ex in exs]
    # row 1: its 5th thought character replaced (offset (5 - 1) % 3 = 1 counted from the first
    # generated token, which is a main token); row 2: the last step's last digit wrong
    t1 = right[1][:4] + ("0" if right[1][4] != "0" else "1") + right[1][5:]
    t2 = right[2][:-1] + ("0" if right[2][-1] != "0" else "1")
    roll = ScriptedRoll([right[0], t1, t2], [exs[0].answer, exs[1].answer, "0"])
    e = first_errors(roll, task, exs, "fast")
    assert e.n == 3 and e.exact == 1
    assert e.accuracy_if_exact == 1.0 and e.accuracy_if_not == 0.5
    n2 = len(right[2]) - 1
    assert e.by_offset == {4 % (K + 1): 1, n2 % (K + 1): 1}
    assert e.by_step == {1: 1, right[2].count(" ") + 1: 1}
