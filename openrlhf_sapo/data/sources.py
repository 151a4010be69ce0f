"""Where the rows come from: splits read from the Hugging Face hub or from local copies.

A split is a `SplitSource`: one or more `Part`s (a file, a hub config, a saved dataset), each a
contiguous run of rows with the place they came from. Local copies (`--from-disk`) are a
`save_to_disk` folder, a folder of per-split jsonl/json/parquet files (hub-style shards included), or
single files bound to a split with `SPLIT=PATH`. Images are not decoded through `datasets` (Arrow
batches give them as `{"bytes", "path"}`), so a broken image is a reportable row instead of a crash;
a line that is not JSON becomes an `UnreadableRow`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

_SPLIT_BINDING_RE = re.compile(r"^([A-Za-z0-9_.\-]+)=(.+)$")
_SHARD_RE = r"-\d+-of-\d+"
_FILE_EXTS = (".jsonl", ".json", ".parquet")


class UsageError(Exception):
    """Bad flags or unreadable input as a whole (exit code 2), as opposed to bad rows."""


class UnreadableRow:
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
            yield UnreadableRow(f"invalid JSON on line {lineno}: {e}")


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
