"""GSM8K (`openai/gsm8k`, config `main`) -> OpenRLHF prompt data.

    python -m openrlhf_sapo.data.gsm8k --output-dir data/gsm8k
    python -m openrlhf_sapo.data.gsm8k --output-dir data/gsm8k --from-disk /copies/gsm8k

Source rows: `question`, `answer` (a worked solution ending in `#### <number>`); splits train / test.
The label is the number after the last `####` with thousands commas removed ("#### 1,234" -> "1234");
a row without `####`, or whose final answer is not a number, is a bad row. Output rows:

    {"prompt": "<question> You FIRST think ... \\boxed{}.", "label": "72", "answer_type": "number",
     "datasource": "gsm8k", "source": "openai/gsm8k:main", "id": "gsm8k/train/0"}
"""

from __future__ import annotations

import argparse
import re
import sys

from openrlhf_sapo.data import common

DEFAULT_HUB_ID = "openai/gsm8k"
DEFAULT_HUB_CONFIG = "main"
SPLITS = ("train", "test")

_NUMBER_RE = re.compile(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)")


class AnswerError(ValueError):
    pass


def final_answer(solution: str) -> str:
    """The number after the last `####` of a GSM8K solution, commas removed; `AnswerError` otherwise."""
    if "####" not in solution:
        raise AnswerError("no '####' final answer in the answer field")
    tail = solution.rsplit("####", 1)[1].strip()
    number = tail.replace(",", "")
    if number.startswith("$"):
        number = number[1:].strip()
    if not _NUMBER_RE.fullmatch(number):
        raise AnswerError(f"final answer after '####' is not a number: {tail!r}")
    return number


def extract(row: dict) -> common.Extracted:
    solution = row.get("answer")
    answer, issue = None, None
    if solution is None or (isinstance(solution, str) and not solution.strip()):
        issue = "empty answer"
    elif not isinstance(solution, str):
        issue = f"answer field is a {type(solution).__name__}, not text"
    else:
        try:
            answer = final_answer(solution)
        except AnswerError as e:
            issue = str(e)
    return common.Extracted(problem=row.get("question"), answer=answer, answer_type="number", answer_issue=issue)


SPEC = common.DatasetSpec(
    name="gsm8k", title="GSM8K", splits=SPLITS, multimodal=False, extract=extract, eval_split="test"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m openrlhf_sapo.data.gsm8k",
        description=__doc__.split("\n\n")[0] + " Writes <split>.jsonl under --output-dir and prints the "
        "OpenRLHF flags that read them. Exit codes: 0 written, 1 bad rows (nothing written unless "
        "--skip-bad), 2 usage or input errors.",
    )
    common.add_hub_args(parser, DEFAULT_HUB_ID, DEFAULT_HUB_CONFIG,
                        "dataset config, 'main' or 'socratic' (default: %(default)s)")
    common.add_common_args(parser, SPLITS, multimodal=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return common.main_wrapper(SPEC, args, common.hub_sources(args))


if __name__ == "__main__":
    sys.exit(main())
