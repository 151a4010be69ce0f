"""Finding the answer in a response: the response part of a chat transcript, the last complete
``\\boxed{...}``, and the release's format term (``<think>...</think>`` then a box).

Pure string work in linear time (no sympy); the standard library only.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple

__all__ = [
    "SCAN_WINDOW_CHARS",
    "answer_and_format",
    "extract_final_answer",
    "format_score",
    "last_assistant_turn",
    "response_from_query",
]

SCAN_WINDOW_CHARS = 1 << 20  # \boxed is searched in the last 1 Mi chars of a response (linear, ~0.3 s at worst)

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
BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escape (\{ \} \\ ...) or a grouping brace


def require_str(value, what: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    return value


def last_assistant_turn(text: str) -> str:
    """Text after the last assistant-turn marker of a chat template (the whole text when there is none)."""
    require_str(text, "text")
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
    require_str(query, "query")
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
    for tok in BRACE_TOKEN_RE.finditer(text, openers[0]):
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


def answer_and_format(response: str) -> Tuple[Optional[str], float]:
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
    require_str(response, "response")
    return answer_and_format(response)[0]


def format_score(response: str) -> float:
    """The release's format term: 1.0 if the response (after the last assistant turn, surrounding
    whitespace and trailing end-of-turn tokens removed) starts with ``<think>``, closes it with
    ``</think>``, and has a complete ``\\boxed{...}`` after that; else 0.0."""
    require_str(response, "response")
    return answer_and_format(response)[1]
