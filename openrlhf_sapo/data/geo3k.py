"""Geometry3K (`hiyouga/geometry3k`) -> OpenRLHF multi-modal prompt data.

    python -m openrlhf_sapo.data.geo3k --output-dir data/geo3k
    python -m openrlhf_sapo.data.geo3k --output-dir data/geo3k --from-disk /copies/geometry3k

Source rows: `images` (list of images), `problem` (text with an `<image>` tag), `answer`; splits
train (2101) / validation (300) / test (601). Output rows:

    {"prompt": "<image>Find x. You FIRST think ... \\boxed{}.", "label": "3",
     "images": ["/abs/out/images/train/0.png"], "answer_type": "number",
     "datasource": "geo3k", "source": "hiyouga/geometry3k", "id": "geo3k/train/0"}

A problem without an `<image>` tag gets one tag per image prepended (reported as repaired); a row
whose tag count differs from its image count, or without any image, is a bad row.
"""

from __future__ import annotations

import argparse
import sys

from openrlhf_sapo.data import common

DEFAULT_HUB_ID = "hiyouga/geometry3k"
SPLITS = ("train", "validation", "test")


def extract(row: dict) -> common.Extracted:
    images = row["images"] if "images" in row else row.get("image")
    return common.Extracted(problem=row.get("problem"), answer=row.get("answer"), images=images)


SPEC = common.DatasetSpec(
    name="geo3k", title="Geo3K", splits=SPLITS, multimodal=True, extract=extract, eval_split="test"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_sapo.data.geo3k",
        description=__doc__.split("\n\n")[0] + " Writes <split>.jsonl and images/<split>/<row>.png under "
        "--output-dir and prints the OpenRLHF flags that read them. Exit codes: 0 written, 1 bad rows "
        "(nothing written unless --skip-bad), 2 usage or input errors.",
    )
    common.add_hub_args(parser, DEFAULT_HUB_ID)
    common.add_common_args(parser, SPLITS, multimodal=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_wrapper(SPEC, args, common.hub_sources(args))


if __name__ == "__main__":
    sys.exit(main())
