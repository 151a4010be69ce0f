"""Tests of the demo tasks (openrlhf_sapo/demo/tasks.py): seeded generation, splits, images, labels,
rewards and the warm-start mistake generator. Labels and steps are re-derived here independently
(Python's own evaluation of the expressions, sklearn's digits read directly)."""

import re
from collections import Counter

import numpy as np
import pytest
from sklearn.datasets import load_digits

from openrlhf_sapo.demo import tasks as T

EQ = re.compile(r"(-?\d+)([+\-*])(-?\d+)=(-?\d+)")
# Pairs of digits that look alike; a misread must swap a digit for one of these.
LOOKALIKE = {frozenset(p) for p in [(3, 8), (1, 7), (4, 9), (5, 6), (3, 5), (0, 6), (0, 8), (2, 7)]}


@pytest.fixture(scope="module")
def sk():
    d = load_digits()
    return d.images, d.target


@pytest.fixture(scope="module")
def digits():
    return T.get_task("digits")


@pytest.fixture(scope="module")
def arith():
    return T.get_task("arithmetic", max_ops=4)


def _truth_numbers(task, ex, sk):
    """The operands as the ground truth has them: sklearn targets for the digits task, the numbers in
    the prompt for the arithmetic task."""
    if task.name == "digits":
        return [int(sk[1][i]) for i in ex.meta["image_indices"]]
    return [int(v) for v in re.findall(r"\d+", ex.prompt)]


def _expression(task, ex, numbers):
    if task.name == "digits":
        expr = ex.prompt.split("Compute ")[1].rstrip(".")
        return "".join(str(numbers["abc".index(c)]) if c in "abc" else c for c in expr)
    ops = re.findall(r"[+\-*]", ex.prompt)
    return "".join(f"{n}{o}" for n, o in zip(numbers, ops + [""]))


def _parse(task, text):
    """(read digits or None, [(x, op, y, z)], boxed answer as int)."""
    parts = text.split(task.step_sep)
    box = re.fullmatch(r"\\boxed\{(-?\d+)\}", parts[-1])
    assert box, f"no final box in {text!r}"
    body = parts[:-1]
    read = None
    if task.name == "digits":
        assert re.fullmatch(r"\d(,\d)+", body[0]), text
        read, body = [int(c) for c in body[0].split(",")], body[1:]
    eqs = []
    for p in body:
        m = EQ.fullmatch(p)
        assert m, f"bad step {p!r} in {text!r}"
        eqs.append((int(m[1]), m[2], int(m[3]), int(m[4])))
    return read, eqs, int(box[1])


def _true(eq):
    x, op, y, z = eq
    return eval(f"{x}{op}({y})") == z


def _flow_leftover(inputs, eqs):
    """Check that every step's operands are inputs or earlier results (each used once); returns
    the values never consumed."""
    pool = Counter(inputs)
    for x, _, y, z in eqs:
        for v in (x, y):
            assert pool[v] > 0, f"operand {v} comes from nowhere in {eqs} (inputs {inputs})"
            pool[v] -= 1
        pool[z] += 1
    return sorted(pool.elements())


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "arithmetic"])
def test_sampling_is_deterministic_by_seed(name):
    task = T.get_task(name)
    a, b, c = task.sample(40, "train", 7), task.sample(40, "train", 7), task.sample(40, "train", 8)
    key = lambda exs: [(e.prompt, e.solution, e.label, e.meta, [im.tobytes() for im in e.images]) for e in exs]
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert key(a) != key(task.sample(40, "heldout", 7))
    w1 = [w.text for e in a for w in task.warm_start_solutions(e, np.random.default_rng(3), 0.5, n=3)]
    w2 = [w.text for e in a for w in task.warm_start_solutions(e, 3, 0.5, n=3)]
    assert w1 == w2


def test_digit_splits_are_disjoint_stratified_and_used(digits, sk):
    train, held = T.digit_split_indices("train"), T.digit_split_indices("heldout")
    assert not set(train) & set(held)
    assert sorted(set(train) | set(held)) == list(range(len(sk[1])))
    assert 0.15 < len(held) / len(sk[1]) < 0.25
    for c in range(10):  # every digit has handwriting in both splits
        assert (sk[1][held] == c).sum() > 10 and (sk[1][train] == c).sum() > 50
    used = {s: {i for e in digits.sample(400, s, 0) for i in e.meta["image_indices"]} for s in T.SPLITS}
    assert used["train"] <= set(train) and used["heldout"] <= set(held)
    assert not used["train"] & used["heldout"]
    assert len(used["heldout"]) > 150  # draws spread over the pool, not a handful of images


def test_arithmetic_splits_are_disjoint():
    task = T.get_task("arithmetic")
    train = {e.prompt for e in task.sample(2000, "train", 0)}
    held = {e.prompt for e in task.sample(1000, "heldout", 0)}
    assert len(held) > 200 and not train & held


def test_digit_images_come_from_sklearn(digits, sk):
    centres = [int(3.5 * i + 1.75) for i in range(8)]  # a pixel inside each source cell after 8 -> 28
    for ex in digits.sample(60, "heldout", 1):
        (img,) = ex.images
        k = len(ex.meta["image_indices"])
        assert img.mode == "RGB" and img.size == (28 * k, 28) and k in (2, 3)
        arr = np.asarray(img).astype(int)
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 0] == arr[..., 2]).all()
        for slot, idx in enumerate(ex.meta["image_indices"]):
            tile = arr[:, 28 * slot : 28 * (slot + 1), 0]
            src = sk[0][idx] * 255 / 16
            sampled = tile[np.ix_(centres, centres)]
            assert np.abs(sampled - src).max() <= 0.5
            assert set(np.unique(tile)) == set(np.unique(sampled))  # no new grey levels


@pytest.mark.parametrize("name", ["digits", "arithmetic"])
def test_labels_and_reference_solutions_are_right(name, sk):
    task = T.get_task(name, max_ops=4) if name == "arithmetic" else T.get_task(name)
    exs = task.sample(300, "train", 2) + task.sample(100, "heldout", 2)
    n_ops = Counter()
    for ex in exs:
        nums = _truth_numbers(task, ex, sk)
        assert int(ex.label) == eval(_expression(task, ex, nums)), ex
        read, eqs, box = _parse(task, ex.solution)
        if name == "digits":
            assert read == nums
        assert all(_true(e) for e in eqs), ex.solution
        assert box == int(ex.label) and (not eqs or eqs[-1][3] == box)
        assert _flow_leftover(read or nums, eqs) == [box]
        assert len(eqs) == len(re.findall(r"[+\-*]", ex.prompt.split("Compute ")[-1]))
        assert task.reward(ex.solution, ex.label) == 1.0 and task.format_ok(ex.solution)
        n_ops[len(eqs)] += 1
    if name == "arithmetic":
        assert set(n_ops) == {1, 2, 3, 4}
        assert all(e.meta["n_ops"] == len(_parse(task, e.solution)[1]) for e in exs)
    else:
        assert set(n_ops) == {1, 2}


def test_reward_exact_match_of_last_box(arith):
    r = arith.reward
    assert r("2+3=5\n\\boxed{5}", "5") == 1.0
    assert r("\\boxed{ 5 }", "5") == 1.0
    assert r("2+3=6\n\\boxed{6}", "5") == 0.0
    assert r("2+3=5\n5", "5") == 0.0  # no box
    assert r("", "5") == 0.0
    assert r("\\boxed{5", "5") == 0.0  # unclosed
    assert r("\\boxed{5}\n\\boxed{6}", "5") == 0.0  # last box wins
    assert r("\\boxed{6}\n\\boxed{5}", "5") == 1.0
    assert r("\\boxed{55}", "5") == 0.0 and r("\\boxed{5.0}", "5") == 0.0 and r("\\boxed{-5}", "5") == 0.0
    assert r("\\boxed{-5}", "-5") == 1.0
    # format term
    assert r("2+3=5\n\\boxed{5}", "5", format_weight=0.5) == 1.5
    assert r("junk \\boxed{5}", "5", format_weight=0.5) == 1.0
    assert r("2+3=6\n\\boxed{6}", "5", format_weight=0.5) == 0.5
    assert r("\\boxed{6}\n\\boxed{5}", "5", format_weight=0.5) == 1.0  # two boxes: bad format
    assert T.get_task("arithmetic", format_weight=0.2).reward("\\boxed{5}", "5") == pytest.approx(1.2)
    d = T.get_task("digits")
    assert d.format_ok("3,5\n3+5=8\n\\boxed{8}") and not d.format_ok("3+5=8\n\\boxed{8}")


@pytest.mark.parametrize("name,kinds", [("digits", {"misread", "slip", "carry", "skip"}),
                                        ("arithmetic", {"slip", "carry", "skip"})])
def test_warm_start_mistakes(name, kinds, sk):
    task = T.get_task(name)
    exs = task.sample(1500, "train", 3)
    rng = np.random.default_rng(0)
    seen, n_wrong, n, slip_at = Counter(), 0, 0, set()
    for ex in exs:
        nums = _truth_numbers(task, ex, sk)
        _, ref_eqs, _ = _parse(task, ex.solution)
        for w in task.warm_start_solutions(ex, rng, 0.3, n=2):
            n += 1
            if w.mistake is None:
                assert w.text == ex.solution and w.answer == ex.label
                continue
            n_wrong += 1
            seen[w.mistake] += 1
            read, eqs, box = _parse(task, w.text)
            assert str(box) == w.answer != ex.label and task.reward(w.text, ex.label) == 0.0
            assert task.format_ok(w.text)
            assert not eqs or eqs[-1][3] == box  # the answer is what the last step computed
            inputs = read or nums
            left = _flow_leftover(inputs, eqs)  # values flow from the inputs through the steps
            false_steps = [i for i, e in enumerate(eqs) if not _true(e)]
            offset = 1 if read is not None else 0
            parts = w.text.split(task.step_sep)
            assert w.text[w.wrong_span[0] : w.wrong_span[1]] == parts[w.wrong_step]
            if w.mistake == "misread":
                diff = [i for i in range(len(nums)) if read[i] != nums[i]]
                assert len(diff) == 1 and frozenset((read[diff[0]], nums[diff[0]])) in LOOKALIKE
                assert not false_steps and left == [box] and w.wrong_step == 0
                assert box == eval(_expression(task, ex, read))
            elif w.mistake in ("slip", "carry"):
                assert read is None or read == nums
                assert len(false_steps) == 1 and left == [box]
                x, op, y, z = eqs[false_steps[0]]
                err = z - eval(f"{x}{op}{y}")
                assert w.wrong_step == offset + false_steps[0]
                if w.mistake == "slip":
                    assert abs(err) == 1
                    slip_at.add((false_steps[0], len(eqs)))
                else:
                    assert (op == "+" and err == -10 and x % 10 + y % 10 >= 10) or (
                        op == "-" and err == 10 and x % 10 < y % 10), eqs[false_steps[0]]
            else:  # skip: one operation and its operand left out, the rest computed right
                assert read is None or read == nums
                assert not false_steps and len(eqs) == len(ref_eqs) - 1
                assert len(left) == 2 and box in left  # one input never used
                expr = _expression(task, ex, nums)
                toks = re.findall(r"\d+|[+\-*]", expr)
                dropped = {eval("".join(toks[: 2 * j + 1] + toks[2 * j + 3 :])) for j in range(len(toks) // 2)}
                assert box in dropped
                assert eqs[: w.wrong_step - offset] == ref_eqs[: w.wrong_step - offset]
    assert set(seen) == kinds, seen
    # slips happen before the last step too (later steps then carry the wrong value forward)
    assert any(k < m - 1 for k, m in slip_at), slip_at
    assert min(seen.values()) > 30
    assert abs(n_wrong / n - 0.3) < 0.03, n_wrong / n


@pytest.mark.parametrize("name", ["digits", "arithmetic"])
def test_error_rate_extremes_and_kind_filter(name):
    task = T.get_task(name)
    exs = task.sample(200, "train", 4)
    assert all(w.mistake is None for e in exs for w in task.warm_start_solutions(e, 0, 0.0, n=3))
    assert all(w.mistake is not None for e in exs for w in task.warm_start_solutions(e, 0, 1.0, n=3))
    only = [w.mistake for e in exs for w in task.warm_start_solutions(e, 1, 1.0, kinds=("slip",))]
    assert set(only) == {"slip"}
    with pytest.raises(ValueError, match="error_rate"):
        task.warm_start_solutions(exs[0], 0, 1.5)
    with pytest.raises(ValueError, match="mistake kinds"):
        task.warm_start_solutions(exs[0], 0, 0.5, kinds=("typo",))


@pytest.mark.parametrize("name,kw", [("digits", {}), ("arithmetic", {"max_ops": 4})])
def test_lengths_and_charset(name, kw):
    task = T.get_task(name, **kw)
    rng = np.random.default_rng(5)
    for ex in task.sample(1500, "train", 5):
        assert len(ex.prompt) <= T.MAX_PROMPT_CHARS and len(ex.solution) <= T.MAX_SOLUTION_CHARS
        assert set(ex.prompt) | set(ex.solution) <= set(task.charset)
        for w in task.warm_start_solutions(ex, rng, 1.0, n=2):
            assert len(w.text) <= T.MAX_SOLUTION_CHARS and set(w.text) <= set(task.charset)


def test_registry_options_and_errors():
    assert set(T.TASKS) == {"digits", "arithmetic"} and T.DEFAULT_TASK == "digits"
    assert isinstance(T.get_task(), T.DigitsTask)
    with pytest.raises(ValueError, match="unknown demo task"):
        T.get_task("chess")
    with pytest.raises(ValueError, match="split"):
        T.get_task("arithmetic").sample(3, "test")
    with pytest.raises(ValueError, match="max_ops"):
        T.get_task("arithmetic", max_ops=5)
    with pytest.raises(ValueError, match="template"):
        T.get_task("digits", templates=("a/b",))
    with pytest.raises(ValueError, match="step_sep"):
        T.get_task("arithmetic", step_sep="=")
    bar = T.get_task("arithmetic", step_sep="|", min_ops=3, max_ops=3)
    for ex in bar.sample(20, "train", 0):
        assert "\n" not in ex.solution and ex.solution.count("|") == 3
        assert bar.reward(ex.solution, ex.label) == 1.0 and bar.format_ok(ex.solution)
        for w in bar.warm_start_solutions(ex, 0, 1.0, n=2):
            assert w.text.split("|")[-1].startswith("\\boxed{")
