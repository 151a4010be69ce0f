"""One raw row to one OpenRLHF prompt row: what a dataset module supplies (`DatasetSpec`, `Extracted`),
the run's `Options`, and `process_row`, which validates a row (empty problem or answer, missing or
unreadable image, `<image>` tags that do not match the images) and builds the output record (prompt
with the instruction, label, images, answer type, datasource, source, id).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from openrlhf_sapo.data.images import ImageError, as_image_list, image_to_png
from openrlhf_sapo.data.sources import Part, UnreadableRow
from openrlhf_sapo.rewards.answer_types import guess_answer_type

IMAGE_TAG = "<image>"

# The instruction of the SAPO release's prompts; it follows the problem text (after
# `--instruction-sep`) because OpenRLHF ignores `--data.input_template` with a chat template.
DEFAULT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)
DEFAULT_INSTRUCTION_SEP = " "


def as_text(value) -> str:
    """A field as text: None -> "", numbers -> str(number)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(type(value).__name__)


@dataclass
class Extracted:
    """What a dataset module reads from one raw row."""

    problem: object
    answer: object
    images: object = None  # raw image field (multimodal datasets)
    extra: dict = field(default_factory=dict)  # more keys for the output row (JSON-serialisable)
    answer_type: str | None = None  # None: guessed from the label
    answer_issue: str | None = None  # why no answer could be read (replaces "empty answer")


@dataclass
class DatasetSpec:
    name: str  # the default `datasource`, the id prefix and the progress label
    title: str  # for messages, e.g. "Geo3K"
    splits: tuple[str, ...]  # default output splits, in order
    multimodal: bool
    extract: Callable[[dict], Extracted]
    eval_split: str  # the split suggested for --eval.dataset


@dataclass(frozen=True)
class Issue:
    split: str
    row: int
    row_id: str
    message: str

    def __str__(self) -> str:
        return f"[{self.split}] row {self.row} ({self.row_id}): {self.message}"


@dataclass
class Options:
    output_dir: str
    instruction: str = DEFAULT_INSTRUCTION
    instruction_sep: str = DEFAULT_INSTRUCTION_SEP
    skip_bad: bool = False
    overwrite: bool = False
    max_rows: int | None = None
    progress: bool = True
    image_mode: str = "absolute"  # "absolute" | "relative" | "embed"
    datasource: str | None = None


def build_prompt(problem: str, instruction: str, sep: str) -> str:
    problem = problem.strip()
    return problem + sep + instruction if instruction else problem


def _image_name(row: int, k: int, n: int) -> str:
    return f"{row}.png" if n == 1 else f"{row}_{k}.png"


def process_row(spec: DatasetSpec, raw, split: str, row: int, part: Part, opts: Options):
    """-> (record or None, issues [str], notes [str], images [(file name, png bytes)])."""
    if isinstance(raw, UnreadableRow):
        return None, [raw.message], [], []
    if not isinstance(raw, dict):
        return None, [f"row is a {type(raw).__name__}, not an object"], [], []
    try:
        ext = spec.extract(raw)
        problem, answer = as_text(ext.problem), as_text(ext.answer).strip()
    except TypeError as e:
        return None, [f"problem/answer has an unsupported type ({e})"], [], []
    issues, notes, images = [], [], []
    if not problem.strip():
        issues.append("empty problem")
    if ext.answer_issue:
        issues.append(ext.answer_issue)
    elif not answer:
        issues.append("empty answer")

    tags = problem.count(IMAGE_TAG)
    if spec.multimodal:
        refs = as_image_list(ext.images)
        for k, ref in enumerate(refs):
            try:
                images.append((_image_name(row, k, len(refs)), image_to_png(ref, part.base_dir)))
            except ImageError as e:
                issues.append(f"image {k} unreadable: {e}")
        if not refs:
            issues.append("no image")
        elif tags == 0:
            problem = IMAGE_TAG * len(refs) + problem.lstrip()
            notes.append(f"prepended {len(refs)} {IMAGE_TAG} tag(s): the problem had none")
        elif tags != len(refs):
            issues.append(
                f"{tags} {IMAGE_TAG} tag(s) for {len(refs)} image(s): OpenRLHF puts one image per tag, "
                "so they must match"
            )
    elif tags:
        issues.append(
            f"text contains {IMAGE_TAG!r}, which OpenRLHF's chat-template path turns into an image "
            "placeholder, but this dataset has no images"
        )
    if issues:
        return None, issues, [], []  # a dropped row is not also reported as repaired

    record = {"prompt": build_prompt(problem, opts.instruction, opts.instruction_sep), "label": answer}
    if spec.multimodal:
        record["images"] = [_image_ref(name, png, split, opts) for name, png in images]
    record["answer_type"] = ext.answer_type or guess_answer_type(answer)
    record["datasource"] = opts.datasource or spec.name
    record["source"] = part.origin
    record["id"] = f"{spec.name}/{split}/{row}"
    for key, value in ext.extra.items():
        record.setdefault(key, value)
    return record, [], notes, images


def _image_ref(name: str, png: bytes, split: str, opts: Options) -> str:
    if opts.image_mode == "embed":
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    if opts.image_mode == "relative":
        return f"images/{split}/{name}"
    return os.path.join(os.path.abspath(opts.output_dir), "images", split, name)
