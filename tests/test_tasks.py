"""Tasks: seeded generators, exact verifiers, train/eval disjoint, tfds round trip."""

import re

import pytest

from mtp.config import ConfigError, UserError
from mtp.data.format import render
from mtp.data.tasks import TASKS, make_task, split_of
from mtp.data.tasks.primes import digit_sum, is_prime

# reasoning-gym's tasks score with its own (lenient) verifier: tests/test_reasoning_gym.py
NAMES = sorted(n for n in TASKS if not n.startswith("rg_"))
N = 40  # examples per property check
CONTEXT = 512  # the models' longest context, in bytes
HARDEST = {
    "addition": {"digits": 32, "thought": 1},
    "multiplication": {"digits": 16, "multiplier_digits": 5, "thought": 1},
    "primes": {"count": 20, "modulus": 99, "below": 10**6},
    "parity": {"bits": 200},
    "lookup": {"symbols": 26, "hops": 25},
}


@pytest.mark.parametrize("name", NAMES)
def test_example_is_a_function_of_the_seed(name):
    a, b = make_task(name), make_task(name)
    assert [a.example(s) for s in range(N)] == [b.example(s) for s in range(N)]
    assert len({a.example(s) for s in range(N)}) > N // 2
    assert a.examples("eval", 5, start=3) == b.examples("eval", 8)[3:]


@pytest.mark.parametrize("name", NAMES)
def test_train_and_eval_problems_are_disjoint(name):
    task = make_task(name)
    train, eval_ = task.examples("train", 10 * N), task.examples("eval", N)
    assert {split_of(ex.prompt) for ex in train} == {"train"}
    assert {split_of(ex.prompt) for ex in eval_} == {"eval"}
    assert not {ex.prompt for ex in train} & {ex.prompt for ex in eval_}


@pytest.mark.parametrize("name", NAMES)
def test_true_answer_scores_one_and_wrong_or_malformed_zero(name):
    task = make_task(name)
    for ex in task.examples("train", N):
        assert task.score(ex.prompt, ex.answer) == 1.0
        wrong = [ex.answer + "0", " " + ex.answer, "", "?", "\x00\xff", "<eos>", "9" * 1000]
        wrong.append(chr(ord(ex.answer[-1]) ^ 1))  # another digit or letter
        for bad in wrong:
            assert task.score(ex.prompt, bad) == 0.0, bad


@pytest.mark.parametrize("name", NAMES)
def test_partial_credit_counts_characters_from_the_end(name):
    task = make_task(name)
    for ex in task.examples("train", N):
        a = ex.answer
        assert task.partial_score(ex.prompt, a) == 1.0
        assert task.partial_score(ex.prompt, "") == 0.0
        wrong_first = chr(ord(a[0]) ^ 1) + a[1:]  # one character off, the rest in place
        assert task.partial_score(ex.prompt, wrong_first) == (len(a) - 1) / len(a)
        assert task.partial_score(ex.prompt, a + "0") < 1.0  # longer: never full credit
    add = make_task("addition", digits=4)
    assert add.partial_score("4821+9375=", "14196") == 1.0
    assert add.partial_score("4821+9375=", "4196") == 0.8  # the leading 1 missing
    assert add.partial_score("4821+9375=", "14186") == 0.8


@pytest.mark.parametrize("name", NAMES)
def test_score_rejects_a_prompt_of_another_task(name):
    with pytest.raises(ValueError):
        make_task(name).score("hello", "1")


@pytest.mark.parametrize("name", NAMES)
def test_rendered_text_fits_max_len_and_the_context(name):
    for task in (make_task(name), make_task(name, **HARDEST[name])):
        assert task.max_len <= CONTEXT
        for ex in task.examples("train", N):
            text = render(ex)
            assert text == f"{ex.prompt}<think>{ex.thought}</think>{ex.answer}"
            assert len(text.encode()) == len(text) <= task.max_len
            assert len(ex.answer) <= task.max_answer_len


def test_hardest_difficulties_are_the_allowed_maxima():
    for name, hardest in HARDEST.items():
        for key, value in hardest.items():
            with pytest.raises(ConfigError, match=key):
                make_task(name, **{**hardest, key: value + 1})


def test_addition_thought_is_the_carry_chain():
    task = make_task("addition", digits=7)
    for ex in task.examples("train", N):
        a, b = ex.prompt[:-1].split("+")
        a, b = a.rjust(len(b), "0")[::-1], b.rjust(len(a), "0")[::-1]
        steps = [re.fullmatch(r"(\d)\+(\d)\+(\d)=(\d)(\d)", s).groups() for s in ex.thought.split()]
        carry = "0"
        for i, (x, y, c, carry_out, digit) in enumerate(steps):
            assert (x, y, c) == (a[i], b[i], carry)
            assert int(x) + int(y) + int(c) == int(carry_out + digit)
            carry = carry_out
        digits = "".join(s[4] for s in steps)[::-1]
        assert ex.answer == (carry + digits).lstrip("0")


@pytest.mark.parametrize(
    "name, difficulty, longest",
    [("addition", {"digits": 3}, "999+999=<think></think>1998"),
     ("multiplication", {"digits": 2, "multiplier_digits": 2}, "99*99=<think></think>9801")],
)  # fmt: skip
def test_thought_0_answers_directly(name, difficulty, longest):
    written, direct = make_task(name, **difficulty), make_task(name, **difficulty, thought=0)
    for a, b in zip(written.examples("eval", N), direct.examples("eval", N), strict=True):
        assert (b.prompt, b.thought, b.answer) == (a.prompt, "", a.answer)
        assert a.thought and direct.score(b.prompt, b.answer) == 1.0
    assert direct.max_len == len(longest)


def test_multiplication_thought_is_partial_products_and_running_sums():
    task = make_task("multiplication", digits=5, multiplier_digits=3)
    for ex in task.examples("train", N):
        a, b = map(int, ex.prompt[:-1].split("*"))
        items = ex.thought.split()
        partials = [s for s in items if "*" in s]
        sums = [s for s in items if "+" in s]
        assert len(partials) == len(str(b)) and len(sums) == len(str(b)) - 1
        total = 0
        for place, p in enumerate(partials):
            lhs, rhs = p.split("=")
            x, factor = lhs.split("*")
            assert int(x) == a and int(factor) == int(str(b)[::-1][place]) * 10**place
            assert int(rhs) == a * int(factor)
            total += int(rhs)
        for s in sums:
            lhs, rhs = s.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)
        assert ex.answer == str(total) == str(a * b)


def test_primes_thought_rows_are_the_next_primes_with_their_residues():
    task = make_task("primes", count=6, modulus=5, below=500)
    for ex in task.examples("train", N):
        after = int(re.search(r"primes>(\d+)", ex.prompt)[1])
        rows = [tuple(map(int, row.split(":"))) for row in ex.thought.split()]
        assert len(rows) == 6
        previous, total = after, 0
        for q, s, r, t in rows:
            assert is_prime(q) and not any(map(is_prime, range(previous + 1, q)))
            total = (total + r) % 5
            assert (s, r, t) == (digit_sum(q), s % 5, total)
            previous = q
        assert ex.answer == str(total)


def test_parity_thought_is_the_running_parity():
    task = make_task("parity", bits=20)
    for ex in task.examples("train", N):
        bits = ex.prompt.removeprefix("parity ").removesuffix("?")
        assert [len(g) for g in bits.split()] == [8, 8, 4]
        assert [len(g) for g in ex.thought.split()] == [8, 8, 4]
        bits, running = bits.replace(" ", ""), ex.thought.replace(" ", "")
        for i in range(len(bits)):
            assert running[i] == str(bits[: i + 1].count("1") % 2)
        assert ex.answer == running[-1]


def test_lookup_has_no_thought_and_a_short_prompt():
    task = make_task("lookup")
    for ex in task.examples("train", N):
        assert ex.thought == "" and len(ex.prompt) <= 100
        pairs, query = ex.prompt.split(": ")
        step = {p[0]: p[1] for p in pairs.split()}
        hops, start = int(query.split()[0]), query[-2]
        at = start
        for _ in range(hops):
            at = step[at]
        assert ex.answer == at != start
    assert len(make_task("lookup", **HARDEST["lookup"]).example(0).prompt) <= 100


def test_unknown_task_or_parameter_names_what_is_allowed():
    with pytest.raises(ConfigError, match="unknown task 'sorting'.*addition.*lookup"):
        make_task("sorting")
    with pytest.raises(ConfigError, match="'digit'.*allowed: digits"):
        make_task("addition", digit=3)
    with pytest.raises(ConfigError, match="hops must be in 1..3, got 4"):
        make_task("lookup", symbols=4, hops=4)
    with pytest.raises(ConfigError, match="split"):
        make_task("parity").examples("test", 1)


def test_tfds_round_trip_equals_the_examples(tmp_path):
    from mtp.data.tasks.tfds_builder import load_tfds, prepare_tfds

    prepared = prepare_tfds("addition", str(tmp_path), n_train=12, n_eval=5, digits=3)
    loaded = load_tfds("addition", str(tmp_path), n_train=12, n_eval=5, digits=3)
    task = make_task("addition", digits=3)
    for split, n in (("train", 12), ("eval", 5)):
        want = [vars(ex) for ex in task.examples(split, n)]
        for source in (prepared[split], loaded[split]):
            got = [{k: v.decode() for k, v in source[i].items()} for i in range(len(source))]
            assert got == want
    with pytest.raises(UserError, match="prepare_tfds"):
        load_tfds("addition", str(tmp_path), n_train=13, n_eval=5, digits=3)
