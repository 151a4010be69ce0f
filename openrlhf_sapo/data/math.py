"""MATH (train) and MATH500 (test) -> OpenRLHF prompt data.

    python -m openrlhf_sapo.data.math --output-dir data/math
    python -m openrlhf_sapo.data.math --output-dir data/math \\
        --from-disk train=/copies/hendrycks_math_train --from-disk test=/copies/math500.jsonl

train: the MATH training set, by default `EleutherAI/hendrycks_math` (one config per subject, all
seven concatenated in order; fields `problem`, `solution`, `level`, `type`). The original
`hendrycks/competition_math` (one default config) is no longer downloadable; any copy with the same
fields works (`--train-hub-id ID --train-hub-configs ''` for a single default config).
test: MATH500, by default `HuggingFaceH4/MATH-500` (fields `problem`, `answer`, `solution`, `subject`,
`level`, `unique_id`); its problems come from MATH's test set, so they do not overlap train.

The label is the row's `answer` field when it has one, else the content of the last `\\boxed{...}`
(or `\\fbox{...}`) of `solution`, nested braces included. Output rows:

    {"prompt": "<problem> You FIRST think ... \\boxed{}.", "label": "\\frac{1}{2}",
     "answer_type": "expression", "datasource": "math", "source": "EleutherAI/hendrycks_math:algebra",
     "id": "math/train/0", "level": 2, "subject": "Algebra"}

(`level` is an int or null; MATH500 rows also keep `unique_id`.)

This file is named like the standard library's `math`; that is harmless because every import in
this package is absolute (`openrlhf_sapo.data.math`).
"""

from __future__ import annotations

import argparse
import re
import sys

from openrlhf_sapo.data import common

DEFAULT_TRAIN_HUB_ID = "EleutherAI/hendrycks_math"
DEFAULT_TRAIN_CONFIGS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
DEFAULT_TEST_HUB_ID = "HuggingFaceH4/MATH-500"
SPLITS = ("train", "test")

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` in `text` (nested braces kept, escaped
    braces `\\{ \\}` not counted), or of `\\boxed 5`; None if there is none or it is not closed."""
    start, command = max((text.rfind(c), c) for c in _BOX_COMMANDS)
    if start < 0:
        return None
    i = start + len(command)
    if i < len(text) and text[i] == "{":
        depth = 0
        j = i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip()
            j += 1
        return None
    m = re.match(r"\s+([^\s$]+)", text[i:])
    return m.group(1) if m else None


def _level(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", value)
        return int(m.group(1)) if m else None
    return None


def extract(row: dict) -> common.Extracted:
    answer, issue = row.get("answer"), None
    if not (isinstance(answer, str) and answer.strip()) and not isinstance(answer, (int, float)):
        solution = row.get("solution")
        answer = None
        if not isinstance(solution, str) or not solution.strip():
            issue = "empty answer (no `answer` field and no `solution`)"
        else:
            answer = last_boxed(solution)
            if answer is None:
                if any(c in solution for c in _BOX_COMMANDS):
                    issue = "the last \\boxed in the solution is not closed"
                else:
                    issue = "no \\boxed{} answer in the solution"
            elif not answer:
                issue = "empty \\boxed{} answer in the solution"
    subject = row.get("subject", row.get("type"))
    extra = {"level": _level(row.get("level")), "subject": subject if isinstance(subject, str) else None}
    if row.get("unique_id") is not None:
        extra["unique_id"] = str(row["unique_id"])
    return common.Extracted(problem=row.get("problem"), answer=answer, extra=extra, answer_issue=issue)


SPEC = common.DatasetSpec(
    name="math", title="MATH", splits=SPLITS, multimodal=False, extract=extract, eval_split="test"
)


def _configs(value: str) -> list[str | None]:
    configs = [c.strip() for c in value.split(",") if c.strip()]
    return configs or [None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_sapo.data.math",
        description="MATH (train) and MATH500 (test) -> OpenRLHF prompt data. Writes <split>.jsonl under "
        "--output-dir and prints the OpenRLHF flags that read them. Exit codes: 0 written, 1 bad rows "
        "(nothing written unless --skip-bad), 2 usage or input errors. Label: the row's `answer` field, "
        "else the last \\boxed{} of `solution`.",
    )
    hub = parser.add_argument_group("hub input (needs network)")
    hub.add_argument(
        "--train-hub-id", default=DEFAULT_TRAIN_HUB_ID, help="hub dataset for the train split (default: %(default)s)"
    )
    hub.add_argument(
        "--train-hub-configs",
        default=",".join(DEFAULT_TRAIN_CONFIGS),
        help="comma-separated configs of --train-hub-id, concatenated in this order; '' = the default config (default: %(default)s)",
    )
    hub.add_argument(
        "--train-hub-split", default="train", help="split of --train-hub-id to read (default: %(default)s)"
    )
    hub.add_argument("--train-revision", default=None, help="hub revision of --train-hub-id")
    hub.add_argument(
        "--test-hub-id", default=DEFAULT_TEST_HUB_ID, help="hub dataset for the test split (default: %(default)s)"
    )
    hub.add_argument(
        "--test-hub-configs",
        default="",
        help="comma-separated configs of --test-hub-id; '' (default) = the default config",
    )
    hub.add_argument("--test-hub-split", default="test", help="split of --test-hub-id to read (default: %(default)s)")
    hub.add_argument("--test-revision", default=None, help="hub revision of --test-hub-id")
    hub.add_argument("--cache-dir", default=None, help="datasets cache folder")
    common.add_common_args(parser, SPLITS, multimodal=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def hub_sources(splits):
        hub = {
            "train": (args.train_hub_id, _configs(args.train_hub_configs), args.train_hub_split, args.train_revision),
            "test": (args.test_hub_id, _configs(args.test_hub_configs), args.test_hub_split, args.test_revision),
        }
        unknown = [s for s in splits if s not in hub]
        if unknown:
            raise common.UsageError(f"hub input has the splits train and test only, not {', '.join(unknown)}")
        return {
            s: common.hub_split_source(s, hub[s][0], hub[s][1], hub[s][2], hub[s][3], args.cache_dir) for s in splits
        }

    return common.main_wrapper(SPEC, args, hub_sources)


if __name__ == "__main__":
    sys.exit(main())
