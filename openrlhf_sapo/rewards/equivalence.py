"""Is an answer equal to a label: the checks that need no sympy (size caps, identical strings, plain
numbers, option letters) and math-verify for the rest, in the calling process.

``grade_fast`` decides cheap cases here; ``grade_in_process`` adds math-verify (what a helper process of
``verifier_pool`` runs, under a time bound). The public ``is_equivalent`` is in ``grading``, which also
chooses where math-verify runs.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Optional, Tuple, Union

from .answer_types import ANSWER_TYPES, guess_answer_type, label_letter, plain_number, strip_text_wrappers
from .extraction import BRACE_TOKEN_RE, extract_final_answer

__all__ = ["MAX_ANSWER_CHARS", "MAX_BRACE_DEPTH", "Outcome", "grade_fast", "grade_in_process"]

MAX_ANSWER_CHARS = 1000  # longer answers/labels are refused before any parsing
MAX_BRACE_DEPTH = 32  # deeper {} nesting in an answer is refused before any parsing

_CHOICE_ANSWER_RE = re.compile(
    r"(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Z])\)?(?:[.:)]|\s|$)", re.IGNORECASE
)

Outcome = Tuple[bool, str]  # (correct, reason); reason is "ok" when the answer was graded


def _unwrap(s: str) -> str:
    """Strip whitespace and enclosing math delimiters ($...$, $$...$$, \\(...\\), \\[...\\])."""
    s = s.strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
            s = s[len(left) : len(s) - len(right)].strip()
    return s


def _normalize_label(label: str) -> str:
    label = _unwrap(label)
    if "\\boxed" in label or "\\fbox" in label:  # a label given as a boxed solution
        inner = extract_final_answer(label)
        if inner:
            label = _unwrap(inner)
    return label


def _answer_letter(answer: str) -> Optional[str]:
    s = strip_text_wrappers(answer)
    if len(s) == 1 and s.isalpha():
        return s.upper()
    m = _CHOICE_ANSWER_RE.match(s)
    if m and (m.group(1).isupper() or m.end() == len(s)):
        return m.group(1).upper()
    return None


def _max_brace_depth(s: str) -> int:
    depth = best = 0
    for tok in BRACE_TOKEN_RE.finditer(s):
        ch = tok.group()
        if ch == "{":
            depth += 1
            best = max(best, depth)
        elif ch == "}":
            depth = max(0, depth - 1)
    return best


def _check_size(s: str, what: str) -> Optional[str]:
    if len(s) > MAX_ANSWER_CHARS:
        return f"{what} too long ({len(s)} chars > {MAX_ANSWER_CHARS})"
    depth = _max_brace_depth(s)
    if depth > MAX_BRACE_DEPTH:
        return f"{what} nesting too deep (depth {depth} > {MAX_BRACE_DEPTH})"
    return None


def grade_fast(answer: str, label: str, answer_type: str) -> Union[Outcome, Tuple[str, str, str]]:
    """Decide without sympy when possible: returns (correct, reason), or the normalized
    (answer, label, resolved_type) job that needs math-verify."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    answer = _unwrap(answer)
    label = _normalize_label(label)
    if not label:
        return False, "empty label"
    if not answer:
        return False, "empty \\boxed{} answer"
    problem = _check_size(label, "label") or _check_size(answer, "answer")
    if problem:
        return False, problem
    resolved = guess_answer_type(label, for_grader=True) if answer_type == "auto" else answer_type
    if resolved == "choice":
        want = label_letter(label, answer_type)
        if want is None:
            return False, "label is not an option letter"
        got = _answer_letter(answer)
        if got is None:
            return False, "no option letter in answer"
        return got == want, "ok"
    if "".join(answer.split()) == "".join(label.split()):
        return True, "ok"
    a_num, l_num = plain_number(answer), plain_number(label)
    if a_num is not None and l_num is not None:
        if a_num == l_num:
            return True, "ok"
        if "." not in answer and "." not in label:  # distinct integers; decimals go to math-verify's rounding
            return False, "ok"
    return answer, label, resolved


_MV = None  # (parse, verify, extraction_config), imported on first use
_MV_LOCK = threading.Lock()


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is by design (the helper bounds time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Timeout is disabled")


def _math_verify():
    global _MV
    if _MV is None:
        with _MV_LOCK:
            if _MV is None:
                from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

                for name in ("math_verify.parser", "math_verify.grader"):
                    logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())
                config = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())
                _MV = (parse, verify, config)
    return _MV


def _grade_math_verify(answer: str, label: str, mv_timeout: Optional[int]) -> Outcome:
    parse, verify, config = _math_verify()
    gold = parse("\\boxed{" + label + "}", extraction_config=config, parsing_timeout=mv_timeout)
    if not gold:
        return False, "label not parseable"
    pred = parse("\\boxed{" + answer + "}", extraction_config=config, parsing_timeout=mv_timeout)
    if not pred:
        return False, "answer not parseable"
    return bool(verify(gold, pred, timeout_seconds=mv_timeout)), "ok"


def grade_in_process(answer: str, label: str, answer_type: str, mv_timeout: Optional[int]) -> Outcome:
    """Grade here, math-verify included. ``mv_timeout``: math-verify's own (``signal.alarm``) timeout in
    seconds, main thread only; None runs unbounded (the caller bounds the time)."""
    fast = grade_fast(answer, label, answer_type)
    if len(fast) == 2:
        return fast
    return _grade_math_verify(fast[0], fast[1], mv_timeout)
