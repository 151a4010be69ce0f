"""Shared reading, validation and writing for the data-preparation CLIs.

A dataset module (geo3k, gsm8k, math) supplies a `DatasetSpec` whose `extract` maps one raw row
to an `Extracted` (problem text, answer, image references, extra keys); everything else is here:

* reading splits from the Hugging Face hub (`datasets.load_dataset`) or from local copies
  (`--from-disk`: a `save_to_disk` folder, a folder of per-split jsonl/json/parquet files, or
  single files bound to a split with `SPLIT=PATH`), without decoding images through `datasets`
  so that a broken image is a reportable row instead of a crash;
* validating rows (empty problem or answer, missing or unreadable image, `<image>` tags that do
  not match the images) and reporting them with split and row index;
* writing OpenRLHF prompt data: one `<split>.jsonl` per split, images as PNG files under
  `images/<split>/` (absolute paths by default) or embedded as base64 data URIs, into a staging
  folder first so that a failed run leaves the output folder as it was.

Exit codes of `run`: 0 written, 1 bad rows (and no `--skip-bad`), 2 usage or input errors.

What OpenRLHF 0.11.2 does with the rows (read from `openrlhf/datasets/prompts_dataset.py`,
`openrlhf/datasets/utils.py` and `openrlhf/utils/vlm_utils.py`):
* a `.jsonl` path given to `--data.prompt_dataset` / `--eval.dataset` is read with
  `load_dataset("json", data_files=path)`, whose only split is called `train`, so
  `--data.prompt_split` / `--eval.split` must stay at their default `train`;
* with `--data.apply_chat_template` a string prompt becomes one user message whose content is split
  at every `<image>` into `{"type": "image"}` items (text parts are stripped), and
  `--data.input_template` is not used, so the instruction has to be in the prompt itself;
* `row[--data.image_key]` goes to `load_images`, which opens a plain string as a file path relative
  to the *process's* working directory (a Ray/vLLM worker, not this folder), decodes
  `data:image/...;base64,` strings, and skips what it cannot load with a warning only;
* `row.get("datasource", "default")` names the per-dataset eval metrics (`eval_<datasource>_pass1`);
* vLLM accepts no image at all unless `--data.max_images_per_prompt` is at least the number of
  images of a prompt (its default 0 means text-only).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import glob
import io
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

IMAGE_TAG = "<image>"

# The instruction of the SAPO release's prompts; it follows the problem text (after
# `--instruction-sep`) because OpenRLHF ignores `--data.input_template` with a chat template.
DEFAULT_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)
DEFAULT_INSTRUCTION_SEP = " "

EXIT_OK = 0
EXIT_BAD_ROWS = 1
EXIT_USAGE = 2

# Modes PIL writes to PNG as they are; anything else (CMYK, YCbCr, F, ...) is converted to RGB(A).
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}
_BASE64_RE = re.compile(r"[A-Za-z0-9+/\r\n]+={0,2}")
_SPLIT_BINDING_RE = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")
_SHARD_RE = r"-\d+-of-\d+"
_FILE_EXTS = (".jsonl", ".json", ".parquet")


class UsageError(Exception):
    """Bad flags or unreadable input as a whole (exit code 2), as opposed to bad rows."""


class ImageError(Exception):
    """One image reference that cannot be decoded."""


# --------------------------------------------------------------------------------------------
# Row sources


class _UnreadableRow:
    """Stands in for a row that could not be parsed (e.g. an invalid jsonl line)."""

    def __init__(self, message: str):
        self.message = message


@dataclass
class Part:
    """A contiguous run of rows of one split from one place (a file, a hub config, a saved dataset)."""

    num_rows: int
    rows: Callable[[], Iterator[object]]
    origin: str  # written as the `source` of each row
    base_dir: str | None = None  # where relative image paths of these rows are resolved


@dataclass
class SplitSource:
    split: str
    parts: list[Part]

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)


def _arrow_rows(ds, batch_size: int = 256) -> Iterator[dict]:
    # Arrow batches give images as {"bytes", "path"} dicts: nothing is decoded by `datasets`, so a
    # corrupt image becomes a reported row rather than an exception in the middle of the loop.
    for table in ds.with_format("arrow").iter(batch_size=batch_size):
        yield from table.to_pylist()


def part_from_hf_dataset(ds, origin: str, base_dir: str | None = None) -> Part:
    return Part(num_rows=len(ds), rows=lambda: _arrow_rows(ds), origin=origin, base_dir=base_dir)


def _jsonl_rows(lines: list[str]) -> Iterator[object]:
    for lineno, line in lines:
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            yield _UnreadableRow(f"invalid JSON on line {lineno}: {e}")


def part_from_file(path: str) -> Part:
    path = os.path.abspath(path)
    base_dir = os.path.dirname(path)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".parquet":
        import pyarrow.parquet as pq

        try:
            num_rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as e:
            raise UsageError(f"cannot read parquet file {path}: {e}") from e

        def rows():
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                yield from batch.to_pylist()

        return Part(num_rows, rows, origin=path, base_dir=base_dir)
    if ext in (".jsonl", ".json"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {path}: {e}") from e
        if ext == ".json" and text.lstrip().startswith("["):
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path} is not valid JSON: {e}") from e
            return Part(len(data), lambda: iter(data), origin=path, base_dir=base_dir)
        lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
        return Part(len(lines), lambda: _jsonl_rows(lines), origin=path, base_dir=base_dir)
    raise UsageError(f"unsupported file type {ext!r} for {path} (expected one of {', '.join(_FILE_EXTS)})")


def hub_split_source(
    split: str,
    hub_id: str,
    configs: Iterable[str | None],
    hub_split: str,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> SplitSource:
    """Load `hub_split` of `hub_id` (one or several configs, concatenated in the given order)."""
    import datasets as hf_datasets

    parts = []
    for config in configs:
        try:
            ds = hf_datasets.load_dataset(hub_id, config, split=hub_split, revision=revision, cache_dir=cache_dir)
        except Exception as e:
            what = hub_id + (f" (config {config!r})" if config else "") + f", split {hub_split!r}"
            raise UsageError(
                f"could not load {what} from the Hugging Face hub: {type(e).__name__}: {e}\n"
                "Without network access, point --from-disk at a local copy (see --help)."
            ) from e
        parts.append(part_from_hf_dataset(ds, hub_id if not config else f"{hub_id}:{config}"))
    return SplitSource(split, parts)


def parse_from_disk(values: list[str] | None) -> list[tuple[str | None, str]]:
    """`--from-disk` values -> [(split or None, path)]; `SPLIT=PATH` binds a path to a split."""
    specs = []
    for value in values or []:
        m = _SPLIT_BINDING_RE.match(value)
        if m and not os.path.exists(value):
            specs.append((m.group(1), m.group(2)))
        else:
            specs.append((None, value))
    return specs


def _is_dataset_dict_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_dict.json"))


def _is_dataset_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json"))


def _split_files(folder: str, split: str) -> list[str]:
    """Per-split files in `folder` or `folder/data`: `<split>.<ext>` or hub-style shards `<split>-00000-of-00002.<ext>`."""
    found = []
    for sub in (folder, os.path.join(folder, "data")):
        for ext in _FILE_EXTS:
            single = os.path.join(sub, split + ext)
            if os.path.isfile(single):
                found.append([single])
            shards = sorted(
                p
                for p in glob.glob(os.path.join(glob.escape(sub), glob.escape(split) + "-*" + ext))
                if re.fullmatch(re.escape(split) + _SHARD_RE + re.escape(ext), os.path.basename(p))
            )
            if shards:
                found.append(shards)
    if len(found) > 1:
        listing = "; ".join(", ".join(files) for files in found)
        raise UsageError(f"split {split!r} is ambiguous in {folder}: {listing}")
    return found[0] if found else []


def _split_of_file(path: str) -> str:
    name = os.path.basename(path)
    stem = os.path.splitext(name)[0]
    m = re.fullmatch(r"(.+?)" + _SHARD_RE, stem)
    return m.group(1) if m else stem


def _load_from_disk(path: str):
    import datasets as hf_datasets

    try:
        return hf_datasets.load_from_disk(path)
    except Exception as e:
        raise UsageError(f"cannot load the saved dataset {path}: {type(e).__name__}: {e}") from e


def _sources_of_path(path: str, split: str | None, wanted: list[str]) -> dict[str, SplitSource]:
    """What one `--from-disk` value provides, as {split: source}."""
    if not os.path.exists(path):
        raise UsageError(f"--from-disk {path}: no such file or folder")
    apath = os.path.abspath(path)
    if os.path.isfile(apath):
        name = split or _split_of_file(apath)
        if split is None and name not in wanted:
            raise UsageError(
                f"--from-disk {path}: cannot tell which split this file is (its name gives {name!r}, "
                f"expected one of {', '.join(wanted)}); write --from-disk SPLIT={path}"
            )
        return {name: SplitSource(name, [part_from_file(apath)])}
    if _is_dataset_dict_dir(apath):
        dd = _load_from_disk(apath)
        if split is not None:
            if split not in dd:
                raise UsageError(f"--from-disk {split}={path}: the saved DatasetDict has splits {', '.join(dd)}")
            return {split: SplitSource(split, [part_from_hf_dataset(dd[split], f"{apath}[{split}]", apath)])}
        return {
            name: SplitSource(name, [part_from_hf_dataset(dd[name], f"{apath}[{name}]", apath)])
            for name in dd
            if name in wanted
        }
    if _is_dataset_dir(apath):
        if split is None:
            raise UsageError(
                f"--from-disk {path} is a single saved Dataset, not a DatasetDict: "
                f"bind it to a split with --from-disk SPLIT={path} (e.g. train={path})"
            )
        return {split: SplitSource(split, [part_from_hf_dataset(_load_from_disk(apath), apath, apath)])}
    # A plain folder of per-split files.
    names = [split] if split is not None else wanted
    out = {}
    for name in names:
        files = _split_files(apath, name)
        if files:
            out[name] = SplitSource(name, [part_from_file(f) for f in files])
    if split is not None and split not in out:
        raise UsageError(
            f"--from-disk {split}={path}: no {split}.jsonl/.json/.parquet (or {split}-NNNNN-of-NNNNN shards) "
            f"in {path} or {path}/data"
        )
    if not out:
        raise UsageError(
            f"--from-disk {path}: not a save_to_disk folder (no dataset_dict.json / state.json) and no "
            f"per-split files ({', '.join(n + '.jsonl' for n in wanted)}, .json, .parquet) in it or in its data/"
        )
    return out


def local_split_sources(from_disk: list[str], wanted: list[str], explicit: bool) -> dict[str, SplitSource]:
    """Resolve `--from-disk` values to {split: source} for the `wanted` splits.

    A split asked for with `--splits` (`explicit`) must be found; of the default splits, those that
    are missing are reported and left out.
    """
    found: dict[str, SplitSource] = {}
    for split, path in parse_from_disk(from_disk):
        for name, src in _sources_of_path(path, split, wanted).items():
            if name not in wanted:
                if split is not None:
                    raise UsageError(f"--from-disk {split}={path}: split {split!r} is not one of {', '.join(wanted)}")
                continue
            if name in found:
                raise UsageError(f"split {name!r} is given twice by --from-disk")
            found[name] = src
    missing = [s for s in wanted if s not in found]
    if missing and explicit:
        raise UsageError(f"--from-disk gives no data for split(s) {', '.join(missing)}")
    if not found:
        raise UsageError(f"--from-disk gives none of the splits {', '.join(wanted)}")
    if missing:
        print(
            f"note: no local data for split(s) {', '.join(missing)}; writing {', '.join(found)} only", file=sys.stderr
        )
    return {s: found[s] for s in wanted if s in found}


# --------------------------------------------------------------------------------------------
# Images


def _png_bytes_from_encoded(data: bytes) -> bytes:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return png_bytes(im)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{type(e).__name__}: {e}") from e


def png_bytes(im) -> bytes:
    """Encode a PIL image as PNG (deterministic for the same pixels, mode and PIL version)."""
    if im.mode not in _PNG_MODES:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def image_to_png(ref, base_dir: str | None) -> bytes:
    """Decode one image reference fully and return it as PNG bytes; raise `ImageError` if impossible.

    Accepted: PIL images, raw encoded bytes, `{"bytes": ..., "path": ...}` dicts (how `datasets`
    stores an `Image` feature; bytes win), `data:image/...;base64,` strings, bare base64 strings,
    and file paths (relative ones are resolved against `base_dir`, the folder of the input file or
    saved dataset). URLs are refused: nothing is downloaded.
    """
    from PIL import Image

    if isinstance(ref, Image.Image):
        try:
            ref.load()
            return png_bytes(ref)
        except (OSError, ValueError) as e:
            raise ImageError(f"{type(e).__name__}: {e}") from e
    if isinstance(ref, (bytes, bytearray)):
        if not ref:
            raise ImageError("empty bytes")
        return _png_bytes_from_encoded(bytes(ref))
    if isinstance(ref, dict):
        data, path = ref.get("bytes"), ref.get("path")
        if isinstance(data, str) and data:
            return image_to_png(data, base_dir)
        if data:
            return _png_bytes_from_encoded(bytes(data))
        if path:
            return image_to_png(str(path), base_dir)
        raise ImageError("image entry has neither bytes nor a path")
    if isinstance(ref, str):
        s = ref.strip()
        if not s:
            raise ImageError("empty path")
        if s.startswith("data:"):
            header, _, payload = s.partition(",")
            if not header.endswith(";base64") or not payload:
                raise ImageError(f"not a base64 data URI: {s[:40]!r}...")
            try:
                return _png_bytes_from_encoded(base64.b64decode(payload, validate=True))
            except binascii.Error as e:
                raise ImageError(f"bad base64 in data URI: {e}") from e
        if s.startswith(("http://", "https://")):
            raise ImageError(f"URL {s!r} is not downloaded; give local files, bytes or base64")
        path = s if os.path.isabs(s) or base_dir is None else os.path.join(base_dir, s)
        if os.path.isfile(path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise ImageError(f"cannot read {path}: {e}") from e
            return _png_bytes_from_encoded(data)
        if len(s) > 256 and _BASE64_RE.fullmatch(s):
            try:
                return _png_bytes_from_encoded(base64.b64decode(s, validate=False))
            except (binascii.Error, ImageError):
                pass  # a long path that happens to use only base64 characters
        raise ImageError(f"file not found: {path}")
    raise ImageError(f"unsupported image value of type {type(ref).__name__}")


def as_image_list(value) -> list:
    """A row's image field as a list: None -> [], a single reference -> [it]."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# --------------------------------------------------------------------------------------------
# Answers


_NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_RATIO_RE = re.compile(r"[-+]?\d+\s*/\s*\d+")
_CHOICE_RE = re.compile(r"\(?[A-E]\)?")
_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")


def guess_answer_type(label: str) -> str:
    """ "choice" (A-E), "number" (integer/decimal/ratio, optional $, %, thousands commas),
    "text" (words only) or "expression" (everything else, e.g. LaTeX)."""
    s = label.strip()
    if _CHOICE_RE.fullmatch(s):
        return "choice"
    t = s.strip("$").strip()
    if t.endswith("\\%"):
        t = t[:-2].strip()
    t = t.rstrip("%").strip()
    if _NUMBER_RE.fullmatch(t) or _RATIO_RE.fullmatch(t):
        return "number"
    if _TEXT_RE.fullmatch(s):
        return "text"
    return "expression"


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


# --------------------------------------------------------------------------------------------
# Specs, rows, issues


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


@dataclass
class SplitStats:
    read: int = 0
    written: int = 0
    skipped: int = 0
    repaired: int = 0
    max_images: int = 0


def build_prompt(problem: str, instruction: str, sep: str) -> str:
    problem = problem.strip()
    return problem + sep + instruction if instruction else problem


def _image_name(row: int, k: int, n: int) -> str:
    return f"{row}.png" if n == 1 else f"{row}_{k}.png"


def process_row(spec: DatasetSpec, raw, split: str, row: int, part: Part, opts: Options):
    """-> (record or None, issues [str], notes [str], images [(file name, png bytes)])."""
    if isinstance(raw, _UnreadableRow):
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


def upstream_reads_as_base64(ref: str) -> bool:
    """Whether OpenRLHF's `load_images` would take this string for base64 instead of a path: it
    does so for strings over 256 characters whose first 512 use only base64 characters, which an
    absolute path of over 512 letters, digits and slashes does."""
    return len(ref) > 256 and _BASE64_RE.fullmatch(ref[:512]) is not None


def _image_ref(name: str, png: bytes, split: str, opts: Options) -> str:
    if opts.image_mode == "embed":
        return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    if opts.image_mode == "relative":
        return f"images/{split}/{name}"
    return os.path.join(os.path.abspath(opts.output_dir), "images", split, name)


# --------------------------------------------------------------------------------------------
# The run


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled, file=sys.stderr, mininterval=0.5)


def _format_row_list(issues: list[Issue]) -> str:
    by_split: dict[str, list[int]] = {}
    for i in issues:
        by_split.setdefault(i.split, []).append(i.row)
    return "; ".join(f"[{s}] rows {', '.join(map(str, rows))}" for s, rows in by_split.items())


def _check_targets(out_dir: str, splits: list[str], overwrite: bool) -> None:
    existing = [
        p
        for s in splits
        for p in (os.path.join(out_dir, f"{s}.jsonl"), os.path.join(out_dir, "images", s))
        if os.path.lexists(p)
    ]
    if existing and not overwrite:
        raise UsageError(f"output already exists: {', '.join(existing)}; pass --overwrite to replace it")


def check_image_paths(spec: DatasetSpec, opts: Options, splits: list[str]) -> None:
    """Refuse an --output-dir whose image paths OpenRLHF would misread as base64."""
    if spec.multimodal and opts.image_mode != "embed":
        base = os.path.abspath(opts.output_dir) if opts.image_mode == "absolute" else ""
        longest = os.path.join(base, "images", max(splits, key=len), "0.png")
        if upstream_reads_as_base64(longest):
            raise UsageError(
                f"image paths under {base or 'images/'} would be read as base64 by OpenRLHF (their first 512 "
                "characters are letters, digits and '/' only): use a shorter --output-dir or --embed-images"
            )


def run(spec: DatasetSpec, sources: dict[str, SplitSource], opts: Options) -> int:
    """Validate and write every split of `sources`; print the report. Returns the exit code."""
    if IMAGE_TAG in opts.instruction:
        raise UsageError(f"--instruction must not contain {IMAGE_TAG!r}")
    out_dir = os.path.abspath(opts.output_dir)
    splits = list(sources)
    check_image_paths(spec, opts, splits)
    _check_targets(out_dir, splits, opts.overwrite)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".staging-", dir=out_dir)
    try:
        stats: dict[str, SplitStats] = {}
        bad: list[Issue] = []
        repaired: list[Issue] = []
        for split in splits:
            st = stats[split] = SplitStats()
            source = sources[split]
            total = source.num_rows if opts.max_rows is None else min(source.num_rows, opts.max_rows)
            img_dir = os.path.join(staging, "images", split)
            if spec.multimodal and opts.image_mode != "embed":
                os.makedirs(img_dir)
            row = 0
            with (
                open(os.path.join(staging, f"{split}.jsonl"), "w", encoding="utf-8", newline="\n") as out,
                _progress(total, f"{spec.name} {split}", opts.progress) as bar,
            ):
                for part in source.parts:
                    if row >= total:
                        break
                    for raw in part.rows():
                        if row >= total:
                            break
                        row_id = f"{spec.name}/{split}/{row}"
                        record, issues, notes, images = process_row(spec, raw, split, row, part, opts)
                        st.read += 1
                        if notes:
                            st.repaired += 1
                            repaired.extend(Issue(split, row, row_id, n) for n in notes)
                        if issues:
                            st.skipped += 1
                            bad.append(Issue(split, row, row_id, "; ".join(issues)))
                        else:
                            if opts.image_mode != "embed":
                                for name, png in images:
                                    with open(os.path.join(img_dir, name), "wb") as f:
                                        f.write(png)
                            out.write(json.dumps(record, ensure_ascii=False) + "\n")
                            st.written += 1
                            st.max_images = max(st.max_images, len(images))
                        row += 1
                        bar.update(1)

        if repaired:
            print(f"note: {len(repaired)} row(s) repaired:", file=sys.stderr)
            for issue in repaired:
                print(f"  {issue}", file=sys.stderr)
        if bad:
            verb = "dropped (--skip-bad)" if opts.skip_bad else "found"
            print(f"{spec.title}: {len(bad)} bad row(s) {verb}:", file=sys.stderr)
            for issue in bad:
                print(f"  {issue}", file=sys.stderr)
            if not opts.skip_bad:
                print(
                    f"error: {len(bad)} bad row(s) ({_format_row_list(bad)}); nothing was written. "
                    "Fix the data or pass --skip-bad to drop them.",
                    file=sys.stderr,
                )
                _print_counts(stats, written="valid", skipped="bad")
                return EXIT_BAD_ROWS

        for split in splits:
            os.replace(os.path.join(staging, f"{split}.jsonl"), os.path.join(out_dir, f"{split}.jsonl"))
            final_images = os.path.join(out_dir, "images", split)
            if os.path.lexists(final_images):  # only reachable with --overwrite (checked above)
                if os.path.isdir(final_images) and not os.path.islink(final_images):
                    shutil.rmtree(final_images)
                else:
                    os.remove(final_images)
            staged_images = os.path.join(staging, "images", split)
            if os.path.isdir(staged_images):
                os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
                os.replace(staged_images, final_images)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                os.rmdir(out_dir)  # only succeeds if nothing was written
            except OSError:
                pass

    print(f"{spec.title}: wrote {', '.join(f'{s}.jsonl' for s in splits)} to {out_dir}")
    _print_counts(stats)
    for split in splits:
        if stats[split].written == 0:
            print(f"warning: {split}.jsonl is empty", file=sys.stderr)
    print()
    print(openrlhf_flags(spec, out_dir, stats))
    return EXIT_OK


def _print_counts(stats: dict[str, SplitStats], written: str = "written", skipped: str = "skipped") -> None:
    width = max([len("split")] + [len(s) for s in stats])
    print(f"{'split':<{width}}  {'read':>7}  {written:>7}  {skipped:>7}  {'repaired':>8}")
    for split, st in stats.items():
        print(f"{split:<{width}}  {st.read:>7}  {st.written:>7}  {st.skipped:>7}  {st.repaired:>8}")


def openrlhf_flags(spec: DatasetSpec, out_dir: str, stats: dict[str, SplitStats]) -> str:
    splits = list(stats)
    evaluation = set(dict.fromkeys((spec.eval_split, "validation", "test")))
    # A split meant for evaluation is never offered as training data (only a test file was converted: no
    # --data.prompt_dataset line, and a note saying so).
    train = "train" if "train" in splits else next((s for s in splits if s not in evaluation), None)
    evals = [s for s in dict.fromkeys((spec.eval_split, "validation", "test")) if s in splits and s != train]
    lines = [f"--data.prompt_dataset {os.path.join(out_dir, train + '.jsonl')}"] if train else []
    if evals:
        lines.append(f"--eval.dataset {os.path.join(out_dir, evals[0] + '.jsonl')}")
    keys = "--data.input_key prompt --data.label_key label"
    max_images = max(st.max_images for st in stats.values())
    if spec.multimodal:
        keys += f" --data.image_key images --data.max_images_per_prompt {max(max_images, 1)}"
    keys += " --data.apply_chat_template"
    lines.append(keys)
    text = "OpenRLHF flags:\n  " + " \\\n  ".join(lines)
    notes = [
        "a .jsonl file loads as the split 'train': keep --data.prompt_split and --eval.split at their default",
        "the instruction is already in each prompt: do not set --data.input_template",
    ]
    if train is None:
        notes.insert(0, f"no training split was converted (only {', '.join(splits)}): convert the train split too "
                        "for --data.prompt_dataset")
    if len(evals) > 1:
        notes.append(f"other eval split(s): {', '.join(os.path.join(out_dir, s + '.jsonl') for s in evals[1:])}")
    return text + "\n" + "\n".join(f"# {n}" for n in notes)


# --------------------------------------------------------------------------------------------
# Command line


def add_common_args(parser: argparse.ArgumentParser, spec_splits: tuple[str, ...], multimodal: bool) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", required=True, help="folder for <split>.jsonl (created if missing)")
    out.add_argument(
        "--splits",
        default=None,
        help=f"comma-separated splits to write (default: {','.join(spec_splits)}; with --from-disk, "
        "the default splits that are present)",
    )
    out.add_argument(
        "--instruction",
        default=DEFAULT_INSTRUCTION,
        help='text appended to every problem (default: the SAPO release\'s instruction: "%(default)s"); '
        "'' for none. OpenRLHF ignores --data.input_template with --data.apply_chat_template, so the "
        "instruction must be in the data",
    )
    out.add_argument(
        "--instruction-sep",
        default=DEFAULT_INSTRUCTION_SEP,
        help="text between problem and instruction (default: a space)",
    )
    out.add_argument("--datasource", default=None, help="value of the `datasource` key (OpenRLHF eval metric name)")
    out.add_argument("--overwrite", action="store_true", help="replace existing <split>.jsonl and images/<split>/")
    out.add_argument("--max-rows", type=int, default=None, help="read at most this many rows per split (smoke tests)")
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    if multimodal:
        img = out.add_mutually_exclusive_group()
        img.add_argument(
            "--embed-images",
            action="store_true",
            help="store images in the jsonl as data:image/png;base64 URIs instead of PNG files",
        )
        img.add_argument(
            "--relative-image-paths",
            action="store_true",
            help="store image paths as images/<split>/<row>.png relative to --output-dir; OpenRLHF opens "
            "paths relative to the worker's working directory, so this only works when training runs "
            "from --output-dir (default: absolute paths)",
        )
    val = parser.add_argument_group("validation")
    val.add_argument(
        "--skip-bad",
        action="store_true",
        help="drop bad rows (listed with split and row) and write the rest; without it, any bad row makes "
        "the run write nothing and exit with code 1",
    )
    inp = parser.add_argument_group("local input (instead of the hub)")
    inp.add_argument(
        "--from-disk",
        action="append",
        metavar="[SPLIT=]PATH",
        help="read a local copy instead of the hub; repeatable. PATH is a datasets.save_to_disk folder "
        "(a DatasetDict gives its splits by name), a folder of per-split files (<split>.jsonl, .json, "
        ".parquet, or hub-style <split>-00000-of-00001.parquet shards, also under data/), or a single "
        "file named <split>.jsonl/.json/.parquet. SPLIT=PATH binds PATH to one split: a single saved "
        "Dataset, any file, or one split of a DatasetDict. Relative image paths in files are resolved "
        "against the file's folder",
    )


def options_from_args(args: argparse.Namespace) -> Options:
    if args.max_rows is not None and args.max_rows < 0:
        raise UsageError("--max-rows must be >= 0")
    mode = "absolute"
    if getattr(args, "embed_images", False):
        mode = "embed"
    elif getattr(args, "relative_image_paths", False):
        mode = "relative"
    return Options(
        output_dir=args.output_dir,
        instruction=args.instruction,
        instruction_sep=args.instruction_sep,
        skip_bad=args.skip_bad,
        overwrite=args.overwrite,
        max_rows=args.max_rows,
        progress=not args.no_progress,
        image_mode=mode,
        datasource=args.datasource,
    )


def wanted_splits(args: argparse.Namespace, default: tuple[str, ...]) -> tuple[list[str], bool]:
    """-> (splits, whether they were given explicitly)."""
    if args.splits is None:
        return list(default), False
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if not splits:
        raise UsageError("--splits is empty")
    if len(set(splits)) != len(splits):
        raise UsageError(f"--splits repeats a split: {args.splits}")
    return splits, True


def main_wrapper(spec: DatasetSpec, args: argparse.Namespace, hub_sources: Callable[[list[str]], dict]) -> int:
    """Run a module's CLI: hub or local sources, then `run`; usage errors -> message and exit code 2."""
    try:
        opts = options_from_args(args)
        splits, explicit = wanted_splits(args, spec.splits)
        check_image_paths(spec, opts, splits)  # before any download
        if args.from_disk:
            sources = local_split_sources(args.from_disk, splits, explicit)
        else:
            sources = hub_sources(splits)
        return run(spec, sources, opts)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
