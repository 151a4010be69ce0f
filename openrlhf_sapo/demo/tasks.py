"""Tiny offline tasks with verifiable rewards and step-wise solutions, for the SAPO demo.

Two tasks, chosen by name from `TASKS`:

- ``digits`` (default, multi-modal): an RGB image of 2-3 handwritten digits side by side (scikit-learn's
  bundled 8x8 digits, each upscaled to 28x28 px, so one merged image token per digit for a
  Qwen2.5-VL-style encoder with patch 14 and merge 2); the question asks for a small computation
  over the digits.
- ``arithmetic`` (text only): ``3+4*2-5=?`` with single-digit operands; difficulty = number of
  operations.

Solutions are step-wise and compact, steps joined by one fixed separator (``STEP_SEP``, a newline by
default, so `newline` and `step` segmenters have a place to cut)::

    digits     prompt  "Read digits a,b,c. Compute a*b+c."   (+ one 84x28 image)
               solution "3,5,2\\n3*5=15\\n15+2=17\\n\\boxed{17}"
    arithmetic prompt  "3+4*2-5=?"
               solution "4*2=8\\n3+8=11\\n11-5=6\\n\\boxed{6}"

The first step of a digits solution is the reading of the digits; then one step per operation
(multiplications first, left to right, then additions/subtractions left to right); then the boxed
answer. `reward` is an exact match of the last ``\\boxed{}`` content with the label (plus an optional
format term). `warm_start_solutions` produces reference solutions with controlled, realistic mistakes
(misread digit, +-1 slip, carry/borrow error, skipped operation), the rest of the solution computed
consistently from the mistake, so the wrong step is identifiable (its index and character span are
returned).

Everything is generated offline and is seeded: `sample(n, split, seed)` gives the same examples for
the same arguments. The digits task splits scikit-learn's 1797 images into disjoint train / held-out
image pools (stratified by class, fixed split seed), so held-out examples show handwriting never seen
in training; the arithmetic task splits expressions by a stable hash of the prompt.
"""

from __future__ import annotations

import functools
import re
import zlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

STEP_SEP = "\n"
TILE = 28  # px per digit: 2x2 patches of 14 px = one merged Qwen2.5-VL token
MAX_PROMPT_CHARS = 64
MAX_SOLUTION_CHARS = 60
SPLITS = ("train", "heldout")

MISREAD, SLIP, CARRY, SKIP = "misread", "slip", "carry", "skip"
MISTAKE_KINDS = (MISREAD, SLIP, CARRY, SKIP)

# Digits a reader plausibly confuses (symmetric pairs).
CONFUSABLE = {
    0: (6, 8),
    1: (7,),
    2: (7,),
    3: (8, 5),
    4: (9,),
    5: (6, 3),
    6: (5, 0),
    7: (1, 2),
    8: (3, 0),
    9: (4,),
}

_BOX = "\\boxed{"


# --------------------------------------------------------------------------------------------------
# Data records


@dataclass
class Example:
    """One problem. `images` is empty for text-only tasks; `label` is the answer as a string;
    `solution` is the reference step-wise solution ending in `\\boxed{label}`; `meta` holds what was
    used to build it (operands, operators, image indices, split)."""

    prompt: str
    label: str
    solution: str
    images: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class WarmStart:
    """A warm-start solution. `mistake` is None for a correct one, else one of MISTAKE_KINDS;
    `wrong_step` is the index of the first wrong step among `text.split(sep)` (None when correct);
    `wrong_span` its character span [start, end) in `text`; `answer` the boxed answer."""

    text: str
    answer: str
    mistake: str | None = None
    wrong_step: int | None = None
    wrong_span: tuple[int, int] | None = None


# --------------------------------------------------------------------------------------------------
# Step-wise evaluation


def evaluate_steps(numbers, ops, perturb=None):
    """Evaluate `numbers[0] ops[0] numbers[1] ...` with `*` before `+`/`-`, left to right within a
    precedence level, one operation per step. Returns a list of (x, op, y, z) steps; the result is
    the last z (or numbers[0] if there is no operation).

    `perturb=(k, f)` replaces the result z of step k by f(x, op, y, z); later steps use the replaced
    value, so the chain stays consistent with the mistake."""
    values, ops = [int(v) for v in numbers], list(ops)
    if len(values) != len(ops) + 1:
        raise ValueError(f"need len(numbers) == len(ops) + 1, got {len(values)} and {len(ops)}")
    bad = [o for o in ops if o not in "+-*"]
    if bad:
        raise ValueError(f"unsupported operators {bad}; only + - * are allowed")
    steps = []
    for level in ("*", "+-"):
        i = 0
        while i < len(ops):
            if ops[i] not in level:
                i += 1
                continue
            x, op, y = values[i], ops[i], values[i + 1]
            z = x * y if op == "*" else x + y if op == "+" else x - y
            if perturb is not None and perturb[0] == len(steps):
                z = perturb[1](x, op, y, z)
            steps.append((x, op, y, z))
            values[i : i + 2] = [z]
            del ops[i]
    return steps


def _result(numbers, steps):
    return steps[-1][3] if steps else int(numbers[0])


def _step_text(step):
    x, op, y, z = step
    return f"{x}{op}{y}={z}"


def _carry_fix(x, op, y, z):
    """The result a solver gets by mishandling a carry/borrow in `x op y`, or None if the step has
    no carry/borrow (only + and - on non-negative operands)."""
    if x < 0 or y < 0:
        return None
    if op == "+" and (x % 10) + (y % 10) >= 10:
        return z - 10  # dropped carry: 8+5=3, 15+7=12
    if op == "-" and x >= y and (x % 10) < (y % 10):
        return z + 10  # forgot to borrow: 11-5=16
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text` (nested braces allowed), stripped; None if there
    is none or the last one is not closed."""
    start = text.rfind(_BOX)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOX)
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def _as_rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be a numpy Generator or an int seed, got {type(rng).__name__}")


# --------------------------------------------------------------------------------------------------
# Tasks


class Task:
    """Base class: subclasses build `(prompt, numbers, ops, reading)` problems."""

    name = "task"

    def __init__(self, step_sep: str = STEP_SEP, format_weight: float = 0.0):
        if not step_sep or any(c.isdigit() or c in "+-*=,{}\\" for c in step_sep):
            raise ValueError(f"step_sep {step_sep!r} must be non-empty and not clash with the solution syntax")
        if format_weight < 0:
            raise ValueError(f"format_weight must be >= 0, got {format_weight}")
        self.step_sep = step_sep
        self.format_weight = float(format_weight)

    # -- to implement ------------------------------------------------------------------------------
    def _make(self, rng: np.random.Generator, split: str) -> Example:
        raise NotImplementedError

    def _reading(self, ex: Example, numbers) -> list[str]:
        """Steps that come before the computation (the digit reading for the digits task)."""
        return []

    def _misreads(self, ex: Example) -> list[tuple[list[int], int]]:
        """Alternative operand lists from a misreading, with the index of the misread operand."""
        return []

    # -- shared ------------------------------------------------------------------------------------
    @property
    def charset(self) -> str:
        """Every character a prompt or a reference/warm-start solution can contain (for a
        character-level tokenizer)."""
        chars = set("0123456789+-*=,?.{}\\boxed") | set(self.step_sep) | set(self._prompt_chars())
        return "".join(sorted(chars))

    def _prompt_chars(self) -> str:
        return ""

    def sample(self, n: int, split: str = "train", seed: int = 0) -> list[Example]:
        """`n` examples of `split` ("train" or "heldout"); the same arguments give the same examples."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng([int(seed), SPLITS.index(split), zlib.crc32(self.name.encode())])
        return [self._make(rng, split) for _ in range(n)]

    def _render(self, reading: list[str], steps, answer: int) -> str:
        parts = list(reading) + [_step_text(s) for s in steps] + [f"{_BOX}{answer}}}"]
        return self.step_sep.join(parts)

    def _finish(self, prompt, numbers, ops, images, meta) -> Example:
        steps = evaluate_steps(numbers, ops)
        answer = _result(numbers, steps)
        meta = dict(meta, numbers=list(numbers), ops=list(ops))
        ex = Example(prompt=prompt, label=str(answer), solution="", images=images, meta=meta)
        ex.solution = self._render(self._reading(ex, numbers), steps, answer)
        return ex

    def format_ok(self, response: str) -> bool:
        """True if `response` has this task's shape: steps joined by `step_sep`, ending in exactly one
        `\\boxed{integer}` as its last step."""
        parts = response.strip().split(self.step_sep)
        if not re.fullmatch(r"\\boxed\{-?\d+\}", parts[-1]) or response.count(_BOX) != 1:
            return False
        return all(self._step_ok(i, p) for i, p in enumerate(parts[:-1]))

    def _step_ok(self, i: int, part: str) -> bool:
        return re.fullmatch(r"-?\d+[+\-*]-?\d+=-?\d+", part) is not None

    def reward(self, response: str, label: str, format_weight: float | None = None) -> float:
        """1.0 if the content of the last `\\boxed{}` equals `label` exactly (after stripping
        whitespace), else 0.0; plus `format_weight` (default: the task's) times `format_ok`."""
        w = self.format_weight if format_weight is None else float(format_weight)
        got = last_boxed(response)
        correct = float(got is not None and got == str(label).strip())
        return correct + (w * float(self.format_ok(response)) if w else 0.0)

    # -- warm start --------------------------------------------------------------------------------
    def mistake_candidates(self, ex: Example) -> dict[str, list[WarmStart]]:
        """Every single-mistake variant of `ex`'s reference solution whose final answer differs from
        the label, by kind (kinds with no such variant are absent)."""
        numbers, ops = ex.meta["numbers"], ex.meta["ops"]
        ref_steps = evaluate_steps(numbers, ops)
        n_read = len(self._reading(ex, numbers))
        out: dict[str, list[WarmStart]] = {}

        def add(kind, reading, steps, nums, wrong_step):
            ans = _result(nums, steps)
            if str(ans) == ex.label:
                return
            text = self._render(reading, steps, ans)
            parts = text.split(self.step_sep)
            start = sum(len(p) + len(self.step_sep) for p in parts[:wrong_step])
            span = (start, start + len(parts[wrong_step]))
            out.setdefault(kind, []).append(WarmStart(text, str(ans), kind, wrong_step, span))

        for nums, _ in self._misreads(ex):
            add(MISREAD, self._reading(ex, nums), evaluate_steps(nums, ops), nums, 0)
        reading = self._reading(ex, numbers)
        for k in range(len(ref_steps)):
            for d in (-1, 1):
                steps = evaluate_steps(numbers, ops, perturb=(k, lambda x, o, y, z, d=d: z + d))
                add(SLIP, reading, steps, numbers, n_read + k)
            if _carry_fix(*ref_steps[k]) is not None:
                steps = evaluate_steps(numbers, ops, perturb=(k, lambda x, o, y, z: _carry_fix(x, o, y, z)))
                add(CARRY, reading, steps, numbers, n_read + k)
        if len(ops) >= 2:
            for j in range(len(ops)):  # drop operation j and its right operand
                nums = list(numbers[: j + 1]) + list(numbers[j + 2 :])
                sub_ops = list(ops[:j]) + list(ops[j + 1 :])
                steps = evaluate_steps(nums, sub_ops)
                # first step that differs from the reference (or the box if all shown steps agree)
                k = next((i for i, (a, b) in enumerate(zip(steps, ref_steps)) if a != b), len(steps))
                add(SKIP, reading, steps, nums, n_read + k)
        return out

    def warm_start_solutions(self, example: Example, rng, error_rate: float, n: int = 1,
                             kinds=MISTAKE_KINDS) -> list[WarmStart]:
        """`n` solutions for `example`: each is, with probability `error_rate`, a single-mistake
        variant (kind drawn uniformly among the `kinds` available for this example, then a variant
        uniformly), else the reference solution. Every mistaken solution's answer is wrong and
        follows from its (wrong) steps."""
        if not 0.0 <= error_rate <= 1.0:
            raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
        unknown = set(kinds) - set(MISTAKE_KINDS)
        if unknown:
            raise ValueError(f"unknown mistake kinds {sorted(unknown)}; expected a subset of {MISTAKE_KINDS}")
        rng = _as_rng(rng)
        cands = {k: v for k, v in self.mistake_candidates(example).items() if k in kinds}
        available = [k for k in MISTAKE_KINDS if k in cands]
        out = []
        for _ in range(n):
            if available and rng.random() < error_rate:
                kind = available[rng.integers(len(available))]
                out.append(cands[kind][rng.integers(len(cands[kind]))])
            else:
                out.append(WarmStart(example.solution, example.label))
        return out


class ArithmeticTask(Task):
    """`3+4*2-5=?` with operands 1..max_operand and min_ops..max_ops operations; intermediate
    results are kept non-negative. Held-out = prompts whose CRC32 is divisible by `heldout_mod`."""

    name = "arithmetic"

    def __init__(self, min_ops: int = 1, max_ops: int = 3, max_operand: int = 9, heldout_mod: int = 5,
                 **kw):
        super().__init__(**kw)
        if not 1 <= min_ops <= max_ops <= 4:
            raise ValueError(f"need 1 <= min_ops <= max_ops <= 4 (solution length cap), got {min_ops}, {max_ops}")
        if not 2 <= max_operand <= 9:
            raise ValueError(f"max_operand must be in [2, 9], got {max_operand}")
        if heldout_mod < 2:
            raise ValueError(f"heldout_mod must be >= 2, got {heldout_mod}")
        self.min_ops, self.max_ops, self.max_operand = min_ops, max_ops, max_operand
        self.heldout_mod = heldout_mod

    def is_heldout(self, prompt: str) -> bool:
        return zlib.crc32(prompt.encode()) % self.heldout_mod == 0

    def _make(self, rng, split):
        for _ in range(10_000):
            k = int(rng.integers(self.min_ops, self.max_ops + 1))
            numbers = [int(v) for v in rng.integers(1, self.max_operand + 1, size=k + 1)]
            ops = [str(o) for o in rng.choice(list("+-*"), size=k)]
            steps = evaluate_steps(numbers, ops)
            if any(s[3] < 0 for s in steps):
                continue
            prompt = "".join(f"{a}{o}" for a, o in zip(numbers, ops)) + f"{numbers[-1]}=?"
            if self.is_heldout(prompt) != (split == "heldout"):
                continue
            return self._finish(prompt, numbers, ops, [], {"task": self.name, "split": split, "n_ops": k})
        raise RuntimeError("could not draw an arithmetic problem (settings too restrictive)")


@functools.lru_cache(maxsize=1)
def load_digit_images():
    """scikit-learn's bundled handwritten digits: (images [1797, 8, 8] float 0..16, targets [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


def digit_split_indices(split: str, heldout_fraction: float = 0.2, split_seed: int = 0) -> np.ndarray:
    """Sorted image indices of `split`, stratified by class: for each digit, a fixed shuffle of its
    images, the last `heldout_fraction` held out."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    _, targets = load_digit_images()
    rng = np.random.default_rng(split_seed)
    keep = []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(targets == c))
        n_held = max(1, int(round(len(idx) * heldout_fraction)))
        keep.append(idx[len(idx) - n_held :] if split == "heldout" else idx[: len(idx) - n_held])
    return np.sort(np.concatenate(keep))


def digit_tile(index: int) -> Image.Image:
    """Image `index` of scikit-learn's digits as a TILE x TILE RGB image: value v (0..16) becomes grey
    level round(v * 255 / 16), upscaled by nearest neighbour (pixel values are kept exactly)."""
    images, _ = load_digit_images()
    grey = np.rint(images[int(index)] * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(grey, mode="L").resize((TILE, TILE), Image.NEAREST).convert("RGB")


DIGIT_TEMPLATES = ("a+b", "a*b", "a+b+c", "a*b+c", "a+b*c")


class DigitsTask(Task):
    """An image of 2-3 handwritten digits (one 28x28 tile each, left to right = a, b, c) and a
    question `Compute <template>.`; the solution first reads the digits (`3,5,2`), then computes."""

    name = "digits"

    def __init__(self, templates=DIGIT_TEMPLATES, heldout_fraction: float = 0.2, split_seed: int = 0, **kw):
        super().__init__(**kw)
        templates = tuple(templates)
        if not templates:
            raise ValueError("need at least one template")
        for t in templates:
            if not re.fullmatch(r"a([+\-*]b)([+\-*]c)?", t):
                raise ValueError(f"template {t!r} must look like 'a+b' or 'a*b+c' (operands a, b[, c] in order)")
        self.templates = templates
        self.heldout_fraction, self.split_seed = heldout_fraction, split_seed
        _, targets = load_digit_images()
        self._pools = {}
        for s in SPLITS:
            idx = digit_split_indices(s, heldout_fraction, split_seed)
            self._pools[s] = [idx[targets[idx] == c] for c in range(10)]

    def _prompt_chars(self):
        return "Read digits a,b,c. Compute +-*"

    def _make(self, rng, split):
        t = self.templates[int(rng.integers(len(self.templates)))]
        names, ops = t[0::2], list(t[1::2])
        numbers = [int(v) for v in rng.integers(0, 10, size=len(names))]
        indices = [int(self._pools[split][d][rng.integers(len(self._pools[split][d]))]) for d in numbers]
        image = Image.new("RGB", (TILE * len(numbers), TILE))
        for i, idx in enumerate(indices):
            image.paste(digit_tile(idx), (TILE * i, 0))
        prompt = f"Read digits {','.join(names)}. Compute {t}."
        meta = {"task": self.name, "split": split, "template": t, "image_indices": indices, "n_ops": len(ops)}
        return self._finish(prompt, numbers, ops, [image], meta)

    def _reading(self, ex, numbers):
        return [",".join(str(d) for d in numbers)]

    def _misreads(self, ex):
        numbers = ex.meta["numbers"]
        out = []
        for i, d in enumerate(numbers):
            for alt in CONFUSABLE[d]:
                out.append((numbers[:i] + [alt] + numbers[i + 1 :], i))
        return out

    def _step_ok(self, i, part):
        if i == 0:
            return re.fullmatch(r"\d(,\d){1,2}", part) is not None
        return super()._step_ok(i, part)


TASKS = {"digits": DigitsTask, "arithmetic": ArithmeticTask}
DEFAULT_TASK = "digits"


def get_task(name: str = DEFAULT_TASK, **kwargs) -> Task:
    """The task registered under `name` in `TASKS`, built with `kwargs`."""
    if name not in TASKS:
        raise ValueError(f"unknown demo task {name!r}; choose one of {sorted(TASKS)}")
    return TASKS[name](**kwargs)
