"""The data-preparation driver and command line shared by the dataset modules (geo3k, gsm8k, math).

A dataset module supplies a `DatasetSpec` whose `extract` maps one raw row to an `Extracted` (problem
text, answer, image references, extra keys); the rest is shared:

* `openrlhf_sapo.data.sources`: reading splits from the Hugging Face hub (`datasets.load_dataset`) or
  from local copies (`--from-disk`: a `save_to_disk` folder, a folder of per-split jsonl/json/parquet
  files, or single files bound to a split with `SPLIT=PATH`), without decoding images through
  `datasets` so that a broken image is a reportable row instead of a crash;
* `openrlhf_sapo.data.images`: image references to PNG bytes;
* `openrlhf_sapo.data.rows`: validating rows (empty problem or answer, missing or unreadable image,
  `<image>` tags that do not match the images) and building the output rows; the answer type comes
  from `openrlhf_sapo.rewards.answer_types`, the grader's own typing;
* here: the run, which reports bad rows with split and row index and writes OpenRLHF prompt data (one
  `<split>.jsonl` per split, images as PNG files under `images/<split>/` (absolute paths by default) or
  embedded as base64 data URIs) into a staging folder first so that a failed run leaves the output
  folder as it was; the command-line flags; the OpenRLHF flags printed at the end.

Every name the dataset modules and tests use is importable from here.

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
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from openrlhf_sapo.data.images import (  # noqa: F401 - re-exported
    ImageError,
    as_image_list,
    image_to_png,
    png_bytes,
    upstream_reads_as_base64,
)
from openrlhf_sapo.data.rows import (  # noqa: F401 - re-exported
    DEFAULT_INSTRUCTION,
    DEFAULT_INSTRUCTION_SEP,
    IMAGE_TAG,
    DatasetSpec,
    Extracted,
    Issue,
    Options,
    as_text,
    build_prompt,
    process_row,
)
from openrlhf_sapo.data.sources import (  # noqa: F401 - re-exported
    Part,
    SplitSource,
    UnreadableRow,
    UsageError,
    hub_split_source,
    local_split_sources,
    parse_from_disk,
    part_from_file,
    part_from_hf_dataset,
)
from openrlhf_sapo.rewards.answer_types import guess_answer_type  # noqa: F401 - re-exported

EXIT_OK = 0
EXIT_BAD_ROWS = 1
EXIT_USAGE = 2


@dataclass
class SplitStats:
    read: int = 0
    written: int = 0
    skipped: int = 0
    repaired: int = 0
    max_images: int = 0


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


def add_hub_args(parser: argparse.ArgumentParser, hub_id: str, hub_config: str | None = None,
                 config_help: str = "dataset config name") -> None:
    """The flags of a dataset read from one hub id (geo3k, gsm8k); `hub_sources` reads them."""
    hub = parser.add_argument_group("hub input (needs network)")
    hub.add_argument("--hub-id", default=hub_id, help="dataset id on the Hugging Face hub (default: %(default)s)")
    hub.add_argument("--hub-config", default=hub_config, help=config_help)
    hub.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    hub.add_argument("--cache-dir", default=None, help="datasets cache folder")


def hub_sources(args: argparse.Namespace) -> Callable[[list[str]], dict]:
    """The split sources of `add_hub_args`'s flags: split s of --hub-id (its --hub-config, '' = the default)."""
    def sources(splits: list[str]) -> dict:
        config = args.hub_config or None
        return {s: hub_split_source(s, args.hub_id, [config], s, args.revision, args.cache_dir) for s in splits}

    return sources


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
