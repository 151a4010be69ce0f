"""What both CLIs (and `--dry-run`) check after the flags and before anything heavy starts.

The flags themselves are checked by `train_ppo_ray.validate` (ours, then upstream's). Here:
- the datasets the flags name (`--data.prompt_dataset`, `--eval.dataset`), read, not just located:
  every row is a JSON object (jsonl / json), has `--data.input_key` (and `--data.label_key` when
  set); for a VLM, each prompt's `<image>` tags match its images and every local image exists. Only
  the rows a run uses are read (`--data.max_samples`), streamed, so 100k rows take about a second.
  A missing local path is reported as missing, not taken for a hub name;
- that the data makes at least one training step;
- the run directory: `--ckpt.path` holding a run is never silently appended to or overwritten,
  and a resume that finds nothing says where it looked.
Every problem found is reported, each naming its file and rows or its flag and the fix.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

from openrlhf_sapo.utils.vlm_utils import is_vlm_checkpoint

LOCAL_EXTENSIONS = (".json", ".jsonl", ".csv", ".parquet", ".arrow", ".py")
IMAGE_TAG = "<image>"
ROWS_SHOWN = 8
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


class Problems:
    """Problems grouped by (source, what is wrong), with the rows where each occurs."""

    def __init__(self):
        self._rows: Dict[Tuple[str, str], List[int]] = defaultdict(list)
        self._order: List[Tuple[str, str]] = []

    def add(self, source: str, message: str, row: Optional[int] = None) -> None:
        key = (source, message)
        if key not in self._rows:
            self._order.append(key)
        if row is not None:
            self._rows[key].append(row)

    def lines(self) -> List[str]:
        out = []
        for source, message in self._order:
            rows = self._rows[(source, message)]
            where = ""
            if rows:
                shown = ", ".join(str(r) for r in rows[:ROWS_SHOWN])
                more = f" and {len(rows) - ROWS_SHOWN} more" if len(rows) > ROWS_SHOWN else ""
                where = f" row{'s' if len(rows) > 1 else ''} {shown}{more}:"
            out.append(f"{source}:{where} {message}")
        return out

    def __bool__(self) -> bool:
        return bool(self._order)


# ---------------------------------------------------------------- where a dataset is


def looks_local(name: str) -> bool:
    """A path rather than a hub name: absolute, relative with ./ ../ ~, a file extension, deeper than
    owner/name, or under a folder that exists here (`data/geo3k` when ./data exists)."""
    return (name.startswith(("/", "./", "../", "~")) or name.lower().endswith(LOCAL_EXTENSIONS)
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name)
            or ("/" in name and os.path.isdir(name.split("/")[0])))


def dataset_paths(value: Optional[str]) -> List[str]:
    """The datasets of a comma-separated flag value, without upstream's `@data_dir` suffix."""
    return [part.split("@")[0].strip() for part in (value or "").split(",") if part.strip()]


# ---------------------------------------------------------------- reading rows


def _json_rows(path: str) -> Iterator[Tuple[int, object, Optional[str]]]:
    """(row number from 1, row, error) of a jsonl file, or of a .json file holding a list."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        f.seek(0)
        if path.endswith(".json") and head == "[":
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                yield 1, None, f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                return
            yield from ((i, row, None) for i, row in enumerate(rows, 1))
            return
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as err:
                yield i, None, f"not valid JSON ({err.msg} at column {err.colno}): fix or remove the line"


def _parquet_rows(path: str, columns: List[str]) -> Iterator[Tuple[int, object, Optional[str]]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    present = [c for c in columns if c in parquet.schema_arrow.names]
    row = 0
    for batch in parquet.iter_batches(columns=present, batch_size=4096):
        for record in batch.to_pylist():
            row += 1
            yield row, record, None


def _csv_rows(path: str) -> Iterator[Tuple[int, object, Optional[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        for i, record in enumerate(csv.DictReader(f), 2):  # row 1 is the header
            yield i, record, None


def _rows(path: str, columns: List[str]) -> Optional[Iterator[Tuple[int, object, Optional[str]]]]:
    lower = path.lower()
    if lower.endswith((".jsonl", ".json")):
        return _json_rows(path)
    if lower.endswith(".parquet"):
        return _parquet_rows(path, columns)
    if lower.endswith(".csv"):
        return _csv_rows(path)
    return None  # a folder, an arrow file, a loading script: upstream's loaders read those


# ---------------------------------------------------------------- one row


def image_tags(prompt) -> int:
    """`<image>` tags of a prompt, as upstream turns them into image slots (a string, or chat messages
    whose content is a string or a list with {"type": "image"} items)."""
    if isinstance(prompt, str):
        return prompt.count(IMAGE_TAG)
    count = 0
    for message in prompt if isinstance(prompt, list) else []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            count += content.count(IMAGE_TAG)
        elif isinstance(content, list):
            count += sum(1 for item in content if isinstance(item, dict) and item.get("type") == "image")
    return count


def _is_local_image(ref: str) -> bool:
    if ref.startswith(("http://", "https://", "data:")):
        return False
    return not (len(ref) > 256 and _BASE64.fullmatch(ref[:512]))  # upstream reads such strings as base64


def check_row(row, *, input_key: str, label_key: Optional[str], image_key: Optional[str]) -> List[str]:
    """What is wrong with one dataset row (empty if nothing)."""
    if not isinstance(row, dict):
        return [f"a row must be a JSON object with the key '{input_key}', got {type(row).__name__}"]
    problems = []
    prompt = row.get(input_key)
    if prompt is None or (isinstance(prompt, (str, list)) and not prompt):
        keys = ", ".join(sorted(map(str, row))[:8])
        problems.append(f"no prompt under '{input_key}' (--data.input_key; the row has: {keys})")
    if label_key and row.get(label_key) is None:
        problems.append(f"no label under '{label_key}' (--data.label_key)")
    if image_key is not None and prompt is not None:
        images = row.get(image_key)
        images = [] if images is None else images if isinstance(images, list) else [images]
        tags = image_tags(prompt)
        if tags != len(images):
            problems.append(f"the prompt has {tags} {IMAGE_TAG} tag(s) but {len(images)} image(s) under '{image_key}' "
                            "(--data.image_key): each image needs one tag in the prompt, and each tag an image")
        for ref in images:
            if isinstance(ref, str) and _is_local_image(ref) and not os.path.exists(os.path.expanduser(ref)):
                problems.append("an image file does not exist (relative paths are read from the directory the run "
                                "starts in)")
                break
    return problems


# ---------------------------------------------------------------- the checks



def check_datasets(args, problems: Problems) -> Dict[str, int]:
    """Reads every local dataset the flags name; returns the rows a run will use per flag."""
    data = args.data
    vlm = data.max_images_per_prompt > 0 or is_vlm_checkpoint(args.actor.model_name_or_path)
    columns = [c for c in (data.input_key, data.label_key, data.image_key if vlm else None) if c]
    used = {}
    for flag, value, limit in (("--data.prompt_dataset", data.prompt_dataset, data.max_samples),
                               ("--eval.dataset", args.eval.dataset, data.max_samples)):
        total = 0
        for name in dataset_paths(value):
            path = os.path.expanduser(name)
            if not os.path.exists(path):
                if looks_local(name):
                    problems.add(f"{flag} {name}", "no such file or folder (a local path, so it is not looked up on "
                                 "the Hugging Face hub): check the path, relative to the directory the run starts in")
                elif os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
                    problems.add(f"{flag} {name}", "not a local path, and the hub is offline (HF_HUB_OFFLINE / "
                                 "HF_DATASETS_OFFLINE): download it first, or point the flag at local files")
                continue
            rows = _rows(path, columns) if os.path.isfile(path) else None
            if rows is None:
                continue
            count = 0
            for number, row, error in rows:
                if count >= limit:
                    break
                count += 1
                for message in [error] if error else check_row(row, input_key=data.input_key, label_key=data.label_key,
                                                               image_key=data.image_key if vlm else None):
                    problems.add(name, message, number)
            if count == 0:
                problems.add(name, f"no rows ({flag} needs at least one)")
            total += count
        used[flag] = total
    return used


def check_steps(args, rows: int, problems: Problems) -> None:
    """At least one training step: prompts x samples per prompt must fill one --train.batch_size."""
    samples = rows * args.rollout.n_samples_per_prompt
    if 0 < samples < args.train.batch_size:
        problems.add("--train.batch_size", f"{args.train.batch_size} samples per step, but the training data gives "
                     f"{rows} prompts x {args.rollout.n_samples_per_prompt} samples = {samples}: lower "
                     "--train.batch_size / --rollout.batch_size, or use more data (--data.max_samples)")


def check_run_directory(args, resume_flag: str, problems: Problems) -> None:
    """A checkpoint under --ckpt.path is resumed only when asked; a resume finds one."""
    path = os.path.join(args.ckpt.path, "_actor")
    has_checkpoint = os.path.isdir(path) and bool(os.listdir(path))
    if args.ckpt.load_enable and not has_checkpoint and resume_flag == "--resume":
        problems.add("--resume", f"no checkpoint under {path} (--ckpt.path {args.ckpt.path}): nothing to resume; "
                     "run without --resume to start a new run")
    if has_checkpoint and not args.ckpt.load_enable:
        problems.add("--ckpt.path", f"{args.ckpt.path} holds a run already (checkpoint {path}): pass {resume_flag} to "
                     "continue it, or choose another --ckpt.path (or remove that folder) to start a new one")


def preflight(args, resume_flag: str = "--ckpt.load_enable") -> List[str]:
    """Every problem with the datasets, the step count and the run directory, one line each."""
    problems = Problems()
    used = check_datasets(args, problems)
    check_steps(args, used.get("--data.prompt_dataset", 0), problems)
    check_run_directory(args, resume_flag, problems)
    return problems.lines()
