"""Answer typing, defined once: which kind of answer a label is (option letter, number, words, expression).

Used by data preparation (``openrlhf_sapo.data``: the ``answer_type`` written with each row) and by the
grader (``answer_type="auto"``: how to compare an answer with its label), so that a row's type says how
the grader compares it. Also the small label parsers both need: plain numbers, option letters, text
wrappers. No dependency beyond the standard library.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

__all__ = [
    "ANSWER_TYPES",
    "ROW_ANSWER_TYPES",
    "guess_answer_type",
    "label_letter",
    "plain_number",
    "strip_text_wrappers",
]

# What the grader accepts as answer_type ("auto" guesses it from the label).
ANSWER_TYPES = ("auto", "choice", "number", "expression")
# What data preparation writes as a row's answer_type ("text" is graded as an expression).
ROW_ANSWER_TYPES = ("choice", "number", "text", "expression")

_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_RATIO_RE = re.compile(r"[-+]?\d+\s*/\s*\d+")
_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z ]*[A-Za-z]")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE_LABEL_RE = re.compile(r"\(?([A-Z])\)?\.?")  # an option letter as a label, answer_type="choice"
_CHOICE_AUTO_RE = re.compile(r"\(?([A-E])\)?\.?")  # what "auto" (and data preparation) takes for an option letter


def plain_number(s: str) -> Optional[Decimal]:
    """``s`` as a Decimal if it is a plain number (``12``, ``-2.5``, ``.5``, ``1,000``), else None."""
    if len(s) > 64 or not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None


def strip_text_wrappers(s: str) -> str:
    """Remove ``\\text{...}``-like wrappers (their content stays) and ``$`` signs."""
    prev = None
    while prev != s:
        prev, s = s, _WRAPPER_RE.sub(r"\1", s)
    return s.replace("$", "").strip()


def label_letter(label: str, answer_type: str = "auto") -> Optional[str]:
    """The option letter a label names (``B``, ``(B)``, ``B.``, ``\\text{(B)}``), else None: ``A``-``E`` for
    "auto", any capital letter for "choice"."""
    pattern = _CHOICE_AUTO_RE if answer_type == "auto" else _CHOICE_LABEL_RE
    m = pattern.fullmatch(strip_text_wrappers(label))
    return m.group(1) if m else None


def _is_number(label: str) -> bool:
    t = label.strip("$").strip()
    if t.endswith("\\%"):
        t = t[:-2].strip()
    t = t.rstrip("%").strip()
    return _PLAIN_NUMBER_RE.fullmatch(t) is not None or _RATIO_RE.fullmatch(t) is not None


def guess_answer_type(label: str, *, for_grader: bool = False) -> str:
    """The type of a label: "choice" (an option letter ``A``-``E``: ``B``, ``(B)``, ``B.``, ``\\text{(B)}``),
    "number" (integer/decimal/ratio, optional ``$``, ``%``, thousands commas), "text" (words only) or
    "expression" (everything else, e.g. LaTeX).

    ``for_grader=True`` gives one of the grader's types (``ANSWER_TYPES`` without "auto"): words are then
    "expression", since the grader compares them as expressions. Only "choice" changes how the grader
    compares (option letters instead of math-verify).
    """
    s = label.strip()
    if label_letter(s, "auto") is not None:
        return "choice"
    if _is_number(s):
        return "number"
    if not for_grader and _TEXT_RE.fullmatch(s):
        return "text"
    return "expression"
