"""Grading of final math answers, the scoring entry point: the shaped reward of a response, time-bounded.

This module and its siblings have no torch/OpenRLHF dependency; this is the stable API an evaluation
harness uses:

- ``score_response(response, label, ...)`` / ``score_responses(...)``: the shaped reward
  ``(1 - format_weight) * accuracy + format_weight * format``; never raises, and bounds the time spent on
  one answer with a helper process (``verifier_pool``).
- ``is_equivalent(answer, label, answer_type="auto")``: mathematical equivalence via math-verify.
- ``configure_verifier`` / ``check_verifier`` / ``shutdown_verifier``: the default pool of helper processes.
- Re-exported: ``extract_final_answer``, ``format_score``, ``last_assistant_turn``, ``response_from_query``
  (``extraction``), ``ANSWER_TYPES`` (``answer_types``), ``MAX_ANSWER_CHARS``/``MAX_BRACE_DEPTH``
  (``equivalence``), ``VerifierPool`` (``verifier_pool``).

Where things are: ``extraction`` finds the answer in a response (the last complete ``\\boxed{}`` after
the last assistant turn, the format term); ``answer_types`` says what kind of answer a label is;
``equivalence`` compares an answer with a label in the calling process; ``verifier_pool`` runs that
comparison in helper processes with a deadline per answer (see its docstring for how).

Cheap answers never leave the calling process: missing/oversized/too deeply nested answers, plain numbers
(``12`` vs ``12.0`` vs ``1,000``), identical strings and option letters are decided here (20-40 us per
response); the rest go to a helper process in one batch per call.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from typing import List, Optional, Sequence, Tuple, Union

from .answer_types import ANSWER_TYPES
from .equivalence import MAX_ANSWER_CHARS, MAX_BRACE_DEPTH, grade_fast, grade_in_process
from .extraction import (
    SCAN_WINDOW_CHARS,
    answer_and_format,
    extract_final_answer,
    format_score,
    last_assistant_turn,
    require_str,
    response_from_query,
)
from .verifier_pool import VerifierPool

__all__ = [
    "ANSWER_TYPES",
    "DEFAULT_FORMAT_WEIGHT",
    "DEFAULT_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
    "SCAN_WINDOW_CHARS",
    "VerifierPool",
    "check_verifier",
    "configure_verifier",
    "extract_final_answer",
    "format_score",
    "is_equivalent",
    "last_assistant_turn",
    "response_from_query",
    "score_response",
    "score_responses",
    "shutdown_verifier",
]

logger = logging.getLogger("openrlhf_sapo.rewards")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_FORMAT_WEIGHT = 0.1  # the release: 0.9 * accuracy + 0.1 * format


# --------------------------------------------------------------------------- the default pool


_POOL: Optional[VerifierPool] = None
_POOL_LOCK = threading.Lock()
_POOL_OPTIONS = {"workers": 2, "memory_mb": 4096}


def configure_verifier(workers: Optional[int] = None, memory_mb: Optional[int] = None, prestart: bool = False) -> None:
    """Set the default pool's size / per-worker address-space cap (MB, 0 = none). A running pool is
    replaced only when an option changes; ``prestart`` launches the workers now (non-blocking)."""
    global _POOL
    with _POOL_LOCK:
        options = dict(_POOL_OPTIONS)
        if workers is not None:
            if int(workers) < 1:
                raise ValueError(f"workers must be >= 1, got {workers}")
            options["workers"] = int(workers)
        if memory_mb is not None:
            if int(memory_mb) < 0:
                raise ValueError(f"memory_mb must be >= 0, got {memory_mb}")
            options["memory_mb"] = int(memory_mb)
        if options != _POOL_OPTIONS:
            _POOL_OPTIONS.update(options)
            if _POOL is not None:
                _POOL.close()
                _POOL = None
    if prestart:
        _default_pool().prestart()


def _default_pool() -> VerifierPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._pid != os.getpid():  # fresh pool in a forked child
            _POOL = VerifierPool(**_POOL_OPTIONS)
        return _POOL


def check_verifier() -> None:
    """Start the default pool if needed and wait for a ready worker; RuntimeError if none can start."""
    _default_pool().check()


def shutdown_verifier() -> None:
    """Kill the helper processes (they restart on the next call)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
            _POOL = None


# --------------------------------------------------------------------------- equivalence


def is_equivalent(answer: str, label: str, answer_type: str = "auto", timeout_s: Optional[float] = None) -> bool:
    """Whether `answer` is mathematically equivalent to `label` (the reference).

    answer_type: "choice" compares option letters (``B``, ``(B)``, ``\\text{(B)}``, ``(B) 12``);
    "number"/"expression" use math-verify (plain numbers are compared exactly here first:
    ``12`` = ``12.0`` = ``12.00``, ``1,000`` = ``1000``); "auto" takes a label ``A``-``E``/``(A)``-``(E)`` as a
    choice, a plain number as a number, anything else as an expression.
    Answers/labels longer than MAX_ANSWER_CHARS or nested deeper than MAX_BRACE_DEPTH are not equivalent.

    timeout_s=None runs in this process: math-verify's own signal timeouts apply in the main thread, and
    nothing but the size caps bounds it in other threads. With a number, the helper process is used
    (a timeout counts as not equivalent). Raises TypeError/ValueError for non-str inputs or an unknown
    answer_type (``score_response`` never raises).
    """
    require_str(answer, "answer")
    require_str(label, "label")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if timeout_s is not None:
        return _default_pool().grade([(answer, label, answer_type)], float(timeout_s))[0][0]
    in_main = threading.current_thread() is threading.main_thread()
    return grade_in_process(answer, label, answer_type, int(math.ceil(DEFAULT_TIMEOUT_S)) if in_main else None)[0]


# --------------------------------------------------------------------------- scoring

_LOGGED_KINDS = set()
_LOGGED_LOCK = threading.Lock()
_MODEL_SIDE_KINDS = ("no \\boxed{} answer", "empty \\boxed{} answer", "answer too long", "answer nesting too deep",
                     "no option letter in answer", "answer not parseable")


def _reason_kind(reason: str) -> str:
    return re.split(r"[:(0-9]", reason, maxsplit=1)[0].strip()


def _log_once(reason: str) -> None:
    """Log each kind of non-"ok" reason once per process (the first occurrence, with its detail)."""
    kind = _reason_kind(reason)
    with _LOGGED_LOCK:
        if kind in _LOGGED_KINDS:
            return
        _LOGGED_KINDS.add(kind)
    level = logging.INFO if kind.startswith(_MODEL_SIDE_KINDS) else logging.WARNING
    logger.log(level, "math reward: %s (logged once per kind; accuracy 0 for such answers)", reason)


def _result(accuracy: float, fmt: float, reason: str, format_weight: float, answer: Optional[str] = None) -> dict:
    if reason != "ok":
        _log_once(reason)
    reward = (1.0 - format_weight) * accuracy + format_weight * fmt
    return {
        "reward": min(1.0, max(0.0, reward)),
        "accuracy": float(accuracy),
        "format": float(fmt),
        "reason": reason,
        "answer": answer,
    }


def _coerce_label(label) -> str:
    if isinstance(label, str):
        return label
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    if isinstance(label, float) and math.isfinite(label):
        return repr(label)
    raise TypeError(f"bad label type: {type(label).__name__}")


def _check_args(format_weight, timeout_s) -> Tuple[float, float]:
    w, t = float(format_weight), float(timeout_s)
    if not (0.0 <= w <= 1.0):
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight!r}")
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"timeout_s must be a positive finite number, got {timeout_s!r}")
    return w, t


def score_responses(
    responses: Sequence[str],
    labels: Sequence[str],
    answer_type: Union[str, Sequence[str]] = "auto",
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> List[dict]:
    """``score_response`` for a batch (one round trip to a helper process for all answers that need sympy).

    ``answer_type`` is one type for all or one per response. Never raises; with mismatched lengths
    every item gets reward 0 and a reason.
    """
    try:
        responses, labels = list(responses), list(labels)
    except Exception as e:
        return [_result(0.0, 0.0, f"bad argument: {type(e).__name__}: {e}", 0.0)]
    n = len(responses)
    try:
        weight, timeout = _check_args(format_weight, timeout_s)
        types = [answer_type] * n if isinstance(answer_type, str) else list(answer_type)
        if len(labels) != n or len(types) != n:
            raise ValueError(f"{n} responses but {len(labels)} labels and {len(types)} answer types")
        for t in set(types):
            if t not in ANSWER_TYPES:
                raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {t!r}")
    except Exception as e:
        return [_result(0.0, 0.0, f"bad argument: {e}", 0.0) for _ in range(max(n, 1))]

    results: List[Optional[dict]] = [None] * n
    formats = [0.0] * n
    answers: List[Optional[str]] = [None] * n
    jobs, job_index = [], []
    for i, (response, label, atype) in enumerate(zip(responses, labels, types)):
        try:
            if not isinstance(response, str):
                results[i] = _result(0.0, 0.0, f"bad response type: {type(response).__name__}", weight)
                continue
            try:
                label = _coerce_label(label)
            except TypeError as e:
                results[i] = _result(0.0, 0.0, str(e), weight)
                continue
            answer, formats[i] = answer_and_format(response)
            if answer is None:
                results[i] = _result(0.0, formats[i], "no \\boxed{} answer", weight)
                continue
            answers[i] = answer
            fast = grade_fast(answer, label, atype)
            if len(fast) == 2:
                results[i] = _result(float(fast[0]), formats[i], fast[1], weight, answer)
            else:
                jobs.append(list(fast))
                job_index.append(i)
        except Exception as e:  # noqa: BLE001 - the contract is "never raises"
            results[i] = _result(0.0, 0.0, f"internal error: {type(e).__name__}: {e}"[:300], weight)

    if jobs:
        try:
            outcomes = [(ok, reason) for ok, reason, _ in _default_pool().grade(jobs, timeout)]
        except Exception as e:  # noqa: BLE001
            outcomes = [(False, f"verifier unavailable: {type(e).__name__}: {e}"[:300])] * len(jobs)
        for i, (ok, reason) in zip(job_index, outcomes):
            results[i] = _result(1.0 if ok and reason == "ok" else 0.0, formats[i], reason, weight, answers[i])
    return results  # type: ignore[return-value]


def score_response(
    response: str,
    label: str,
    answer_type: str = "auto",
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict:
    """Score one response against its label; never raises.

    Returns ``{"reward", "accuracy" (0/1), "format" (0/1), "reason", "answer"}`` with
    ``reward = (1 - format_weight) * accuracy + format_weight * format``; ``reason`` is "ok" when the
    answer was graded (right or wrong), else why accuracy is 0 ("no \\boxed{} answer",
    "timeout after 5.0s", "answer too long (...)", "verifier error: ...", "bad label type: NoneType", ...);
    ``answer`` is the extracted ``\\boxed{}`` content (None when there is none or the input was unusable).
    Labels may also be int or finite float. Time on sympy is bounded by ``timeout_s`` per answer
    (not counting a one-off wait for a freshly started helper process to import sympy).
    """
    return score_responses([response], [label], answer_type, format_weight, timeout_s)[0]
