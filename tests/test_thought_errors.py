"""First wrong thought token: found at the right place, credited to the right pass slot."""

import numpy as np

from mtp.data.format import encode_prompt
from mtp.data.tasks import make_task
from mtp.data.tokenizer import ByteTokenizer
from mtp.decode.result import DecodeResult
from mtp.decode.thinking import Thought
from mtp.evals.thought_errors import first_errors

K = 2
TOK = ByteTokenizer()
S = TOK.specials


def _result(rows, offsets):
    """A DecodeResult holding `rows` (each with its pass-slot `offsets`), pad after each."""
    b, n = len(rows), max(r.size for r in rows)
    tokens, offset = np.full((b, n), S.pad, np.int32), np.zeros((b, n), np.int32)
    for i, (r, o) in enumerate(zip(rows, offsets, strict=True)):
        tokens[i, : r.size], offset[i, : o.size] = r, o
    lengths = np.array([r.size for r in rows], np.int32)
    passes = np.array([(o == 0).sum() for o in offsets], np.int32)  # a main token per pass
    pass_id = np.cumsum(offset == 0, axis=1) - 1
    z = np.zeros((b, n), bool)
    return DecodeResult("fast", K, tokens, pass_id, offset, lengths, passes,
                        np.zeros(K + 1, np.int32), n, 0.0, False, z, z,
                        np.zeros(b, np.int32), S.pause)  # fmt: skip


def scripted(prompts, thoughts, answers):
    """Stands in for `think_then_answer`: the given thoughts as fast-mode rows (passes of
    K + 1: offsets 0, 1, .., K from the first generated token), then the given answers."""
    prompt_ids = [encode_prompt(TOK, p) for p in prompts]
    rows = [np.append(TOK.encode(t), S.think_close).astype(np.int32) for t in thoughts]
    thought = _result(rows, [np.arange(r.size) % (K + 1) for r in rows])
    ans = [np.append(TOK.encode(a), S.eos).astype(np.int32) for a in answers]
    answer = _result(ans, [np.zeros(a.size, np.int32) for a in ans])
    return Thought(prompt_ids, rows, np.zeros(len(rows), bool), thought, answer)


def test_first_wrong_token_offset_and_step():
    task = make_task("multiplication", digits=2, multiplier_digits=2)
    exs = task.examples("eval", 3)
    right = [ex.thought for ex in exs]
    # row 1: its 5th thought character replaced (offset (5 - 1) % 3 = 1 counted from the first
    # generated token, which is a main token); row 2: the last step's last digit wrong
    t1 = right[1][:4] + ("0" if right[1][4] != "0" else "1") + right[1][5:]
    t2 = right[2][:-1] + ("0" if right[2][-1] != "0" else "1")
    th = scripted([ex.prompt for ex in exs], [right[0], t1, t2],
                  [exs[0].answer, exs[1].answer, "0"])  # fmt: skip
    e = first_errors(th, TOK, task, exs)
    assert e.n == 3 and e.exact == 1
    assert e.accuracy_if_exact == 1.0 and e.accuracy_if_not == 0.5
    n2 = len(right[2]) - 1
    assert e.by_offset == {4 % (K + 1): 1, n2 % (K + 1): 1}
    assert e.by_step == {1: 1, right[2].count(" ") + 1: 1}
