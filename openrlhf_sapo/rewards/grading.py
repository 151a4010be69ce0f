"""Grading of final math answers: extraction, equivalence, the format term, a time-bounded score.

This module has no torch/OpenRLHF dependency and is the stable API an evaluation harness uses:

- ``extract_final_answer(response)``: content of the last complete ``\\boxed{...}`` / ``\\fbox{...}``
  in the text after the last assistant turn (a ``\\boxed{}`` in the prompt/instruction is never picked).
- ``is_equivalent(answer, label, answer_type="auto")``: mathematical equivalence via math-verify.
- ``format_score(response)``: 1.0 for ``<think>...</think>`` followed by text containing ``\\boxed{...}``.
- ``score_response(response, label, ...)`` / ``score_responses(...)``: the shaped reward
  ``(1 - format_weight) * accuracy + format_weight * format``; never raises, and bounds the time spent on
  one answer with a helper process (see below).
- ``response_from_query(query, prompt)``: the response part of an OpenRLHF query (prompt + response).

Time bound. math-verify bounds its own work with ``signal.alarm``, which only works in the main thread
(from another thread ``parse``/``verify`` raise ValueError), and OpenRLHF calls reward functions through
``asyncio.to_thread``. So anything that reaches sympy runs in a persistent helper process (this file run
as a script, ``python grading.py --worker``), talking length-prefixed JSON over pipes: a batch of answers
goes in one message, results come back one by one, and the parent waits for each result at most
``timeout_s`` from the moment the worker starts on it (``poll`` on the pipe, from any thread). Inside the
worker, a SIGALRM at 80% of the timeout interrupts Python-level sympy work so the worker survives (this is
what ends ``9^{9^{9^{9}}}`` or ``(10^{6})!`` in practice); a computation stuck in C code, where no signal
handler runs, is ended by killing the worker, which is restarted at once (without blocking) for the next
answer. Workers have an address-space cap (4 GiB by default) so a runaway allocation fails inside them
instead of exhausting the machine, exit when their parent does (when idle or in Python code), and a worker
found dead is replaced, its answer retried once.

Cheap answers never leave the calling process: missing/oversized/too deeply nested answers, plain numbers
(``12`` vs ``12.0`` vs ``1,000``), identical strings and option letters are decided here (20-40 us per
response). Measured on a 2-core CPU: the round trip adds about 0.13 ms to a one-answer call and 0.04-0.06 ms
per answer in batches of 8-512 (math-verify itself takes 0.3-1 ms on cached parses, 5-200 ms on new ones);
a restart takes about 0.5 s, overlapped with the caller. The worker is a plain script rather than a
multiprocessing target because OpenRLHF loads the reward file by path under a module name that is not
importable, and multiprocessing's spawn would re-import Ray's worker ``__main__``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import queue
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from decimal import Decimal, InvalidOperation
from typing import List, Optional, Sequence, Tuple, Union

__all__ = [
    "ANSWER_TYPES",
    "DEFAULT_FORMAT_WEIGHT",
    "DEFAULT_TIMEOUT_S",
    "MAX_ANSWER_CHARS",
    "MAX_BRACE_DEPTH",
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

ANSWER_TYPES = ("auto", "choice", "number", "expression")
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_FORMAT_WEIGHT = 0.1  # the release: 0.9 * accuracy + 0.1 * format
MAX_ANSWER_CHARS = 1000  # longer answers/labels are refused before any parsing
MAX_BRACE_DEPTH = 32  # deeper {} nesting in an answer is refused before any parsing
SCAN_WINDOW_CHARS = 1 << 20  # \boxed is searched in the last 1 Mi chars of a response (linear, ~0.3 s at worst)
_SOFT_TIMEOUT_FRACTION = 0.8  # worker-side SIGALRM, before the parent's hard kill at 100%
_STARTUP_TIMEOUT_S = 120.0  # import of sympy/math-verify in a fresh worker (not counted in timeout_s)
_CHUNK_ITEMS = 256  # items per message to the worker

# Chat-template markers that open an assistant turn (the response follows the last one).
_ASSISTANT_MARKERS = (
    "<|im_start|>assistant",  # ChatML: Qwen2/2.5/3, Qwen2.5-VL
    "<|start_header_id|>assistant<|end_header_id|>",  # Llama 3
    "<|assistant|>",  # Phi-3, GLM-4, Zephyr
    "<start_of_turn>model",  # Gemma
    "<\uff5cAssistant\uff5c>",  # DeepSeek V3/R1 (full-width bars)
)
# Special tokens that may close a response decoded with skip_special_tokens=False.
_END_TOKENS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
    "<eos>",
    "</s>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
)

_BOX_OPEN_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape (\{ \} \\ ...) or a grouping brace
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_CHOICE_LABEL_RE = re.compile(r"\(?([A-Z])\)?\.?")
_CHOICE_AUTO_RE = re.compile(r"\(?([A-E])\)?\.?")  # what "auto" takes for an option letter
_CHOICE_ANSWER_RE = re.compile(
    r"(?:(?:option|choice|answer)\s*:?\s*)?\(?([A-Z])\)?(?:[.:)]|\s|$)", re.IGNORECASE
)

Outcome = Tuple[bool, str]


# --------------------------------------------------------------------------- extraction


def _require_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    return value


def last_assistant_turn(text: str) -> str:
    """Text after the last assistant-turn marker of a chat template (the whole text when there is none)."""
    _require_str(text, "text")
    cut = -1
    for marker in _ASSISTANT_MARKERS:
        pos = text.rfind(marker)
        if pos >= 0:
            cut = max(cut, pos + len(marker))
    return text if cut < 0 else text[cut:]


def _strip_end_tokens(text: str) -> str:
    text = text.strip()
    changed = True
    while changed:
        changed = False
        for token in _END_TOKENS:
            if text.endswith(token):
                text = text[: -len(token)].rstrip()
                changed = True
    return text


def response_from_query(query: str, prompt: Optional[str] = None) -> str:
    """The response part of an OpenRLHF query (decoded prompt + response, special tokens kept).

    With a chat template, the text after the last assistant marker (this also handles VLM prompts whose
    image pads were expanded, so the decoded prompt no longer equals ``prompt``). Otherwise the prompt
    prefix is removed when the query starts with it, or cut after the first occurrence of the prompt's
    last 64 characters; failing both, the whole query is returned.
    """
    _require_str(query, "query")
    if any(marker in query for marker in _ASSISTANT_MARKERS):
        return last_assistant_turn(query)
    if isinstance(prompt, str) and prompt:
        if query.startswith(prompt):
            return query[len(prompt) :]
        tail = prompt[-64:].strip()
        if tail:
            pos = query.find(tail)
            if pos >= 0:
                return query[pos + len(tail) :]
    return query


def _last_box(text: str, start: int = 0) -> Optional[Tuple[int, int]]:
    """(open, close) brace positions of the last complete \\boxed{...}/\\fbox{...} at or after `start`."""
    openers = [m.end() - 1 for m in _BOX_OPEN_RE.finditer(text, start)]
    if not openers:
        return None
    opener_set = set(openers)
    closes = {}
    stack: List[int] = []
    # One linear pass from the first opener; escaped braces (\{, \}) do not group.
    for tok in _BRACE_TOKEN_RE.finditer(text, openers[0]):
        ch = tok.group()
        if ch == "{":
            stack.append(tok.start())
        elif ch == "}":
            if stack:
                pos = stack.pop()
                if pos in opener_set:
                    closes[pos] = tok.start()
    for pos in reversed(openers):
        if pos in closes:
            return pos, closes[pos]
    return None


def _answer_and_format(response: str) -> Tuple[Optional[str], float]:
    """One scan for both: the last complete box's content, and whether the text (after the last assistant
    turn, whitespace and trailing end-of-turn tokens removed) is <think>...</think> then a complete box."""
    text = _strip_end_tokens(last_assistant_turn(response))
    box = _last_box(text, max(0, len(text) - SCAN_WINDOW_CHARS))
    if box is None:
        return None, 0.0
    answer = text[box[0] + 1 : box[1]].strip()
    if not text.startswith("<think>"):
        return answer, 0.0
    close = text.find("</think>", len("<think>"))
    # the last-opened complete box follows </think> iff some complete box does
    return answer, 1.0 if 0 <= close and close + len("</think>") <= box[0] else 0.0


def extract_final_answer(response: str) -> Optional[str]:
    """Content (stripped) of the last complete ``\\boxed{...}`` or ``\\fbox{...}``; None if there is none.

    Only the text after the last assistant turn is searched (see ``last_assistant_turn``), and only its
    last ``SCAN_WINDOW_CHARS`` characters. Braces balance (``\\{``/``\\}`` do not count); a box left
    open (a truncated response) is skipped in favour of the previous complete one.
    """
    _require_str(response, "response")
    return _answer_and_format(response)[0]


def format_score(response: str) -> float:
    """The release's format term: 1.0 if the response (after the last assistant turn, surrounding
    whitespace and trailing end-of-turn tokens removed) starts with ``<think>``, closes it with
    ``</think>``, and has a complete ``\\boxed{...}`` after that; else 0.0."""
    _require_str(response, "response")
    return _answer_and_format(response)[1]


# --------------------------------------------------------------------------- equivalence


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


def _plain_number(s: str) -> Optional[Decimal]:
    if len(s) > 64 or not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s.replace(",", ""))
    except InvalidOperation:  # pragma: no cover - the regex admits only valid decimals
        return None


def _strip_text_wrappers(s: str) -> str:
    prev = None
    while prev != s:
        prev, s = s, _WRAPPER_RE.sub(r"\1", s)
    return s.replace("$", "").strip()


def _label_letter(label: str, answer_type: str) -> Optional[str]:
    pattern = _CHOICE_AUTO_RE if answer_type == "auto" else _CHOICE_LABEL_RE
    m = pattern.fullmatch(_strip_text_wrappers(label))
    return m.group(1) if m else None


def _answer_letter(answer: str) -> Optional[str]:
    s = _strip_text_wrappers(answer)
    if len(s) == 1 and s.isalpha():
        return s.upper()
    m = _CHOICE_ANSWER_RE.match(s)
    if m and (m.group(1).isupper() or m.end() == len(s)):
        return m.group(1).upper()
    return None


def _max_brace_depth(s: str) -> int:
    depth = best = 0
    for tok in _BRACE_TOKEN_RE.finditer(s):
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


def _guess_type(label: str) -> str:
    if _label_letter(label, "auto") is not None:
        return "choice"
    if _plain_number(label) is not None:
        return "number"
    return "expression"


def _grade_fast(answer: str, label: str, answer_type: str) -> Union[Outcome, Tuple[str, str, str]]:
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
    resolved = _guess_type(label) if answer_type == "auto" else answer_type
    if resolved == "choice":
        want = _label_letter(label, answer_type)
        if want is None:
            return False, "label is not an option letter"
        got = _answer_letter(answer)
        if got is None:
            return False, "no option letter in answer"
        return got == want, "ok"
    if "".join(answer.split()) == "".join(label.split()):
        return True, "ok"
    a_num, l_num = _plain_number(answer), _plain_number(label)
    if a_num is not None and l_num is not None:
        if a_num == l_num:
            return True, "ok"
        if "." not in answer and "." not in label:  # distinct integers; decimals go to math-verify's rounding
            return False, "ok"
    return answer, label, resolved


_MV = None  # (parse, verify, extraction_config), imported on first use
_MV_LOCK = threading.Lock()


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeout is off; here that is by design (the worker bounds time)."""

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


def _grade_in_process(answer: str, label: str, answer_type: str, mv_timeout: Optional[int]) -> Outcome:
    fast = _grade_fast(answer, label, answer_type)
    if len(fast) == 2:
        return fast
    return _grade_math_verify(fast[0], fast[1], mv_timeout)


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
    _require_str(answer, "answer")
    _require_str(label, "label")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if timeout_s is not None:
        return _default_pool().grade([(answer, label, answer_type)], float(timeout_s))[0][0]
    in_main = threading.current_thread() is threading.main_thread()
    return _grade_in_process(answer, label, answer_type, int(math.ceil(DEFAULT_TIMEOUT_S)) if in_main else None)[0]


# --------------------------------------------------------------------------- helper process


def _write_frame(fd: int, obj) -> None:
    data = json.dumps(obj, ensure_ascii=True).encode("ascii")
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _read_exact(fd: int, n: int, deadline: Optional[float]) -> bytes:
    chunks, got = [], 0
    poller = None
    while got < n:
        if deadline is not None:
            if poller is None:
                poller = select.poll()  # not select.select: descriptors above 1024 are common in vLLM actors
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(math.ceil(remaining * 1000)))):
                raise TimeoutError
        chunk = os.read(fd, n - got)
        if not chunk:
            raise EOFError("verifier worker closed its pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_frame(fd: int, deadline: Optional[float]):
    (length,) = struct.unpack(">I", _read_exact(fd, 4, deadline))
    return json.loads(_read_exact(fd, length, deadline).decode("ascii"))


class _WorkerDied(RuntimeError):
    pass


_LIVE_PROCS = set()  # every helper process started by this process, killed at exit
_LIVE_LOCK = threading.Lock()


def _kill_all_helpers() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE_PROCS)
        _LIVE_PROCS.clear()
    for proc in procs:
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # pragma: no cover - already gone
            pass


class _Worker:
    """One helper process; used by one thread at a time (the pool hands it out)."""

    def __init__(self, memory_mb: int):
        self.memory_mb = memory_mb
        self.proc: Optional[subprocess.Popen] = None
        self.ready = False
        self.restarts = 0

    def start(self) -> None:
        """Launch without waiting for it to be ready."""
        env = dict(os.environ)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env.setdefault(var, "1")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", str(int(self.memory_mb))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C to the trainer's process group does not kill it mid-call
            env=env,
        )
        with _LIVE_LOCK:
            _LIVE_PROCS.add(self.proc)
        self.ready = False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        with _LIVE_LOCK:
            _LIVE_PROCS.discard(proc)
        try:
            proc.kill()
            proc.wait(timeout=5)
        except Exception:  # pragma: no cover - already gone
            pass
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except Exception:  # pragma: no cover
                pass

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def ensure_ready(self) -> None:
        if not self.alive():
            if self.proc is not None:
                self.restarts += 1
            self.kill()
            self.start()
        if not self.ready:
            try:
                hello = _read_frame(self.proc.stdout.fileno(), time.monotonic() + _STARTUP_TIMEOUT_S)
            except (TimeoutError, EOFError, OSError, ValueError) as e:
                self.kill()
                raise _WorkerDied(f"worker failed to start ({type(e).__name__}: {e})") from None
            if not hello.get("ready"):
                self.kill()
                raise _WorkerDied(f"worker failed to start: {hello.get('error', hello)}")
            self.ready = True

    def grade(self, jobs: Sequence[Tuple[str, str, str]], timeout_s: float) -> List[Tuple[bool, str, float]]:
        """Grade normalized jobs; each result is (correct, reason, seconds spent in the worker)."""
        results: List[Tuple[bool, str, float]] = []
        timeout_reason = f"timeout after {float(timeout_s)}s"
        retried = -1  # an item whose worker died is retried once (the worker may have died before it)
        while len(results) < len(jobs):
            batch = list(jobs[len(results) : len(results) + _CHUNK_ITEMS])
            message = {"items": batch, "soft_timeout": timeout_s * _SOFT_TIMEOUT_FRACTION}
            try:
                for attempt in range(2):  # a worker that died while idle is replaced once
                    self.ensure_ready()
                    try:
                        _write_frame(self.proc.stdin.fileno(), message)
                        break
                    except OSError as e:
                        self.kill()
                        self.restarts += 1
                        if attempt:
                            raise _WorkerDied(f"could not send to worker ({e})") from None
            except _WorkerDied as e:
                reason = f"verifier unavailable: {e}"
                results.extend((False, reason, 0.0) for _ in range(len(jobs) - len(results)))
                break
            for _ in batch:
                started = time.monotonic()
                try:
                    reply = _read_frame(self.proc.stdout.fileno(), started + timeout_s)
                except TimeoutError:
                    results.append((False, timeout_reason, time.monotonic() - started))
                    self.restart()  # abandons the rest of this batch; it is resent to the new worker
                    break
                except (EOFError, OSError, ValueError) as e:
                    try:
                        code = self.proc.wait(timeout=1.0)
                    except subprocess.TimeoutExpired:
                        code = None
                    if retried != len(results):
                        retried = len(results)
                    else:
                        results.append((False, f"verifier error: worker died (exit code {code}; {e})", 0.0))
                    self.restart()
                    break
                reason = reply["reason"]
                if reason == "timeout":
                    reason = timeout_reason
                results.append((bool(reply["ok"]), reason, float(reply.get("t", 0.0))))
        return results


class VerifierPool:
    """Helper processes running math-verify, handed out to one calling thread at a time."""

    def __init__(self, workers: int = 2, memory_mb: int = 4096):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.size = workers
        self.memory_mb = memory_mb
        self._pid = os.getpid()
        self._all = [_Worker(memory_mb) for _ in range(workers)]
        self._idle: "queue.LifoQueue[_Worker]" = queue.LifoQueue()
        for worker in self._all:
            self._idle.put(worker)

    def _take_idle(self) -> List[_Worker]:
        taken = []
        while True:
            try:
                taken.append(self._idle.get_nowait())
            except queue.Empty:
                return taken

    def prestart(self) -> None:
        """Launch every idle worker now (non-blocking) so the first call does not wait for the imports."""
        taken = self._take_idle()
        try:
            for worker in taken:
                if not worker.alive():
                    worker.start()
        finally:
            for worker in taken:
                self._idle.put(worker)

    def check(self) -> None:
        """Wait until a worker is ready; raises RuntimeError if it cannot start."""
        worker = self._idle.get()
        try:
            worker.ensure_ready()
        except _WorkerDied as e:
            raise RuntimeError(f"the math-verify helper process could not start: {e}") from None
        finally:
            self._idle.put(worker)

    def grade(self, jobs: Sequence[Tuple[str, str, str]], timeout_s: float) -> List[Tuple[bool, str, float]]:
        if not jobs:
            return []
        worker = self._idle.get()
        try:
            return worker.grade(jobs, timeout_s)
        finally:
            self._idle.put(worker)

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self._all)

    def pids(self) -> List[int]:
        return [w.proc.pid for w in self._all if w.alive()]

    def close(self) -> None:
        if os.getpid() != self._pid:  # a forked copy must not kill its parent's workers
            return
        for worker in self._all:
            worker.kill()


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


atexit.register(_kill_all_helpers)


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
            answer, formats[i] = _answer_and_format(response)
            if answer is None:
                results[i] = _result(0.0, formats[i], "no \\boxed{} answer", weight)
                continue
            answers[i] = answer
            fast = _grade_fast(answer, label, atype)
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


# --------------------------------------------------------------------------- worker side


class _SoftTimeout(BaseException):
    """Raised by SIGALRM in the worker; a BaseException so math-verify's `except Exception` lets it through."""


def _worker_main(memory_mb: int) -> None:  # pragma: no cover - runs in the helper process
    out_fd = os.dup(1)
    os.dup2(2, 1)  # stray prints go to stderr, stdout carries only frames
    in_fd = 0
    try:
        if memory_mb > 0:
            import resource

            cap = memory_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

        def _watch_parent(parent: int = os.getppid()) -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(0)

        threading.Thread(target=_watch_parent, daemon=True).start()
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        _grade_in_process("x+1", "1+x", "expression", None)  # import + warm the LaTeX parser
    except Exception as e:
        _write_frame(out_fd, {"ready": False, "error": f"{type(e).__name__}: {e}"})
        raise

    def _alarm(signum, frame):
        raise _SoftTimeout()

    signal.signal(signal.SIGALRM, _alarm)
    _write_frame(out_fd, {"ready": True, "pid": os.getpid()})
    while True:
        try:
            message = _read_frame(in_fd, None)
        except EOFError:
            return
        soft = float(message["soft_timeout"])
        for i, (answer, label, answer_type) in enumerate(message["items"]):
            started = time.perf_counter()
            try:
                try:
                    signal.setitimer(signal.ITIMER_REAL, soft)
                    ok, reason = _grade_in_process(answer, label, answer_type, None)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except _SoftTimeout:
                ok, reason = False, "timeout"
            except MemoryError:
                ok, reason = False, f"verifier error: MemoryError (worker address space capped at {memory_mb} MB)"
            except Exception as e:  # noqa: BLE001
                ok, reason = False, f"verifier error: {type(e).__name__}: {e}"[:300]
            _write_frame(out_fd, {"i": i, "ok": bool(ok), "reason": reason, "t": time.perf_counter() - started})


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "--worker":
    try:
        _worker_main(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
    except (BrokenPipeError, EOFError):  # the parent went away
        os._exit(0)
