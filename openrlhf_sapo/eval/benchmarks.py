"""Benchmark files: one common jsonl format, loading and validation.

Format (one JSON object per line; blank lines are ignored)::

    {"id": "mathvista/17",
     "prompt": "<image>What is the value of x? Answer with \\boxed{}.",
     "images": ["images/17.png"],
     "label": "B",
     "answer_type": "choice",
     "choices": ["3", "4", "5", "6"],
     "benchmark": "MathVista"}

``prompt`` (required, non-empty text)
    The user message. ``<image>`` marks where each image goes (one tag per image, in order). A
    prompt with images but no tag at all gets one tag per image put in front of it; any other
    mismatch between tags and images is an error. The instruction (e.g. "put the final answer in
    \\boxed{}") belongs in the prompt itself: answers are read from the last ``\\boxed{}``.
``label`` (required)
    The reference answer: text or a number; for ``choice`` an option letter (``B``, ``(B)``) or the
    text of one of ``choices`` (converted to its letter).
``images`` (optional, default ``[]``; ``image`` is accepted too)
    Paths relative to the jsonl file's folder, absolute paths, or ``data:image/...;base64,`` URIs.
    Every path must exist when the file is loaded.
``answer_type`` (optional)
    ``choice``, ``number`` or ``expression`` (how the grader compares); ``auto`` or a missing key
    lets the grader guess from the label; ``text`` (written by the data-preparation CLIs for word
    answers) is graded as ``auto``.
``choices`` (optional)
    The options of a multiple-choice question, in letter order (A, B, ...). With them, an answer that
    spells out an option's text instead of its letter also counts.
``id`` (optional, unique within a file)
    Defaults to ``<file stem>/<line number>``; ``benchmark`` (optional) names the benchmark when the
    command line does not (``datasource`` is read too).

The rows that ``python -m openrlhf_sapo.data.{geo3k,gsm8k,math}`` write (``prompt``, ``label``,
``images``, ``answer_type``, ``datasource``, ``id``) are in this format already: pass the ``test.jsonl``
of their output folder, or the folder itself.

Benchmarks of the paper (canonical names; the key is case- and punctuation-insensitive):

* VLM (Table 1, in this order): ``Geo3K`` (Geometry3K test, 601 rows; from
  ``openrlhf_sapo.data.geo3k``), ``LogicVista``, ``MathVerse`` (testmini, vision-only or all versions, as
  chosen when converting), ``WeMath`` (testmini), ``MathVista`` (testmini), ``DynaMath``.
  Converting these public releases: keep the question text (with the multiple-choice options written
  into the prompt when the release has them separately), add ``<image>`` where the release's image goes
  and the instruction to box the final answer, save the image next to the file, set ``label`` to the
  release's answer (option letter for multiple choice, with ``choices``; else the value) and
  ``answer_type`` accordingly (``number`` for numeric answers).
* Text: ``GSM8K`` (test, 1319 rows; ``openrlhf_sapo.data.gsm8k``) and ``MATH500``
  (``openrlhf_sapo.data.math``'s test split, whose rows say ``datasource: math``).
Any other name is evaluated and reported in its own table.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

IMAGE_TAG = "<image>"
ANSWER_TYPES = ("choice", "number", "expression", "auto")
_ACCEPTED_TYPES = ANSWER_TYPES + ("text",)

# The paper's Table 1 order, then the text benchmarks.
VLM_BENCHMARKS = ("Geo3K", "LogicVista", "MathVerse", "WeMath", "MathVista", "DynaMath")
TEXT_BENCHMARKS = ("GSM8K", "MATH500")
KNOWN_BENCHMARKS = VLM_BENCHMARKS + TEXT_BENCHMARKS

_ALIASES = {
    "geometry3k": "Geo3K",
    "geo3k": "Geo3K",
    "logicvista": "LogicVista",
    "mathverse": "MathVerse",
    "mathversetestmini": "MathVerse",
    "wemath": "WeMath",
    "wemathtestmini": "WeMath",
    "mathvista": "MathVista",
    "mathvistatestmini": "MathVista",
    "dynamath": "DynaMath",
    "gsm8k": "GSM8K",
    "math500": "MATH500",
    "math": "MATH500",  # openrlhf_sapo.data.math: datasource "math", its test split is MATH500
}
_SPLIT_NAMES = ("train", "validation", "val", "test", "testmini")
_CHOICE_LETTER_RE = re.compile(r"\(?([A-Z])\)?\.?")


class BenchmarkError(ValueError):
    """A benchmark file or row that cannot be used (the message names the file and the row)."""


def canonical_name(name: str) -> str:
    """`gsm8k` -> `GSM8K`, `MathVista_testmini` -> `MathVista`; other names are kept as given."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _ALIASES.get(key, name)


@dataclass
class Example:
    id: str
    prompt: str
    label: str
    answer_type: str  # one of ANSWER_TYPES (what the grader receives)
    images: list = field(default_factory=list)  # absolute paths or data: URIs
    choices: Optional[list] = None
    line: int = 0
    raw_label: Optional[str] = None  # the label as written, when it was converted (choice text -> letter)


@dataclass
class Benchmark:
    name: str
    path: str
    examples: list

    @property
    def multimodal(self) -> bool:
        return any(ex.images for ex in self.examples)


def _where(path: str, line: int, row_id: Optional[str]) -> str:
    return f"{path}, row {row_id!r} (line {line})" if row_id is not None else f"{path}, line {line}"


def _as_label(value) -> Optional[str]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if value == value and abs(value) != float("inf") else None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _norm_choice(text: str) -> str:
    return " ".join(str(text).replace("$", "").split()).lower()


def _resolve_image(ref, base_dir: str, where: str) -> str:
    if not isinstance(ref, str) or not ref:
        raise BenchmarkError(f"{where}: image entries must be non-empty strings (paths or data: URIs), got {ref!r}")
    if ref.startswith("data:image/"):
        return ref
    path = ref if os.path.isabs(ref) else os.path.join(base_dir, ref)
    if not os.path.isfile(path):
        raise BenchmarkError(f"{where}: image {ref!r} does not exist (looked for {os.path.abspath(path)})")
    return os.path.abspath(path)


def parse_row(row, path: str, line: int, default_id: str) -> Example:
    """One jsonl row -> Example, or BenchmarkError naming the file and the row."""
    if not isinstance(row, dict):
        raise BenchmarkError(f"{path}, line {line}: a row must be a JSON object, got {type(row).__name__}")
    row_id = row.get("id", default_id)
    row_id = str(row_id) if row_id is not None and str(row_id).strip() else default_id
    where = _where(path, line, row_id)

    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BenchmarkError(f"{where}: no prompt (a non-empty 'prompt' text is required; keys: {sorted(row)})")
    if row.get("label") is None:
        raise BenchmarkError(f"{where}: no label (the reference answer 'label' is required; keys: {sorted(row)})")
    label = _as_label(row["label"])
    if label is None:
        raise BenchmarkError(f"{where}: label must be non-empty text or a finite number, got {row['label']!r}")

    answer_type = row.get("answer_type") or "auto"
    if answer_type not in _ACCEPTED_TYPES:
        raise BenchmarkError(f"{where}: answer_type {answer_type!r} is not one of {', '.join(ANSWER_TYPES)}")
    if answer_type == "text":
        answer_type = "auto"

    raw_images = row["images"] if "images" in row else row.get("image")
    if raw_images is None:
        raw_images = []
    elif isinstance(raw_images, str):
        raw_images = [raw_images]
    elif not isinstance(raw_images, list):
        raise BenchmarkError(f"{where}: 'images' must be a list of paths, got {type(raw_images).__name__}")
    base_dir = os.path.dirname(os.path.abspath(path))
    images = [_resolve_image(ref, base_dir, where) for ref in raw_images]
    tags = prompt.count(IMAGE_TAG)
    if images and tags == 0:
        prompt = IMAGE_TAG * len(images) + prompt
    elif tags != len(images):
        raise BenchmarkError(
            f"{where}: the prompt has {tags} {IMAGE_TAG} tag(s) but the row has {len(images)} image(s)"
        )

    choices = row.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not choices or len(choices) > 26:
            raise BenchmarkError(f"{where}: 'choices' must be a list of 1 to 26 options, got {choices!r}")
        choices = [str(c) for c in choices]

    raw_label = None
    if answer_type == "choice":
        m = _CHOICE_LETTER_RE.fullmatch(label)
        if m and (choices is None or ord(m.group(1)) - ord("A") < len(choices)):
            label = m.group(1)
        elif choices is not None and _norm_choice(label) in [_norm_choice(c) for c in choices]:
            raw_label = label
            label = chr(ord("A") + [_norm_choice(c) for c in choices].index(_norm_choice(label)))
        else:
            options = f"A-{chr(ord('A') + len(choices) - 1)} or the text of one of the choices" if choices else "A-Z"
            raise BenchmarkError(f"{where}: a 'choice' label must be an option letter ({options}), got {label!r}")

    return Example(
        id=row_id, prompt=prompt, label=label, answer_type=answer_type, images=images, choices=choices,
        line=line, raw_label=raw_label,
    )


def load_file(path: str, name: Optional[str] = None, limit: Optional[int] = None) -> Benchmark:
    """Read and validate a benchmark jsonl. All rows are validated, then the first `limit` are kept.

    The name is `name` if given, else the rows' `benchmark` (or `datasource`) when they all agree,
    else the file stem (the folder's name for a data-preparation `test.jsonl`)."""
    if not os.path.isfile(path):
        what = "is a folder, not a jsonl file" if os.path.isdir(path) else "does not exist"
        raise BenchmarkError(f"benchmark file {path} {what}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"cannot read benchmark file {path}: {e}") from e

    stem = os.path.splitext(os.path.basename(path))[0]
    examples, seen, named = [], {}, set()
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}, line {lineno}: invalid JSON: {e}") from e
        ex = parse_row(row, path, lineno, default_id=f"{stem}/{lineno}")
        if ex.id in seen:
            raise BenchmarkError(f"{path}: row id {ex.id!r} appears twice (lines {seen[ex.id]} and {lineno})")
        seen[ex.id] = lineno
        examples.append(ex)
        tag = row.get("benchmark") or row.get("datasource")
        named.add(str(tag) if tag else None)
    if not examples:
        raise BenchmarkError(f"benchmark file {path} has no rows")

    if name is None:
        if len(named) == 1 and None not in named:
            name = named.pop()
        elif stem.lower() in _SPLIT_NAMES:
            name = os.path.basename(os.path.dirname(os.path.abspath(path)))
        else:
            name = stem
    if limit is not None:
        examples = examples[:limit]
    return Benchmark(name=canonical_name(name), path=os.path.abspath(path), examples=examples)


def expand_specs(specs: list) -> list:
    """`--benchmarks` values -> [(name or None, file path)].

    ``NAME=PATH`` names a file; a bare file is named by its rows (see `load_file`); a folder gives
    each ``<name>.jsonl`` in it, except a data-preparation output folder (holding ``test.jsonl``),
    which gives its test split only.
    """
    out = []
    for spec in specs:
        name, path = None, spec
        m = re.match(r"^([^=/\\]+)=(.+)$", spec)
        if m and not os.path.exists(spec):
            name, path = m.group(1).strip(), m.group(2)
        if os.path.isdir(path):
            if name is not None:
                test = os.path.join(path, "test.jsonl")
                if not os.path.isfile(test):
                    raise BenchmarkError(
                        f"--benchmarks {spec}: {path} is a folder without test.jsonl; name a jsonl file"
                    )
                out.append((name, test))
                continue
            if os.path.isfile(os.path.join(path, "test.jsonl")):
                out.append((None, os.path.join(path, "test.jsonl")))
                continue
            files = sorted(f for f in os.listdir(path) if f.endswith(".jsonl"))
            if not files:
                raise BenchmarkError(f"--benchmarks {spec}: no <name>.jsonl files in the folder {path}")
            out.extend((os.path.splitext(f)[0], os.path.join(path, f)) for f in files)
        else:
            out.append((name, path))
    return out


def load_benchmarks(specs: list, limit: Optional[int] = None) -> list:
    """Load every benchmark of `--benchmarks`; duplicate names are an error. Sorted in table order."""
    if not specs:
        raise BenchmarkError("no benchmarks given (--benchmarks NAME=PATH.jsonl ... or a folder of <name>.jsonl)")
    loaded = {}
    for name, path in expand_specs(specs):
        bench = load_file(path, name, limit)
        if bench.name in loaded:
            raise BenchmarkError(
                f"benchmark {bench.name!r} is given twice ({loaded[bench.name].path} and {bench.path}); "
                "name them apart with NAME=PATH"
            )
        loaded[bench.name] = bench
    order = {n: i for i, n in enumerate(KNOWN_BENCHMARKS)}
    return sorted(loaded.values(), key=lambda b: (order.get(b.name, len(order)), b.name))
