"""Segmenters: where a response is cut into reasoning segments (spec section 1).

Every segmenter returns bool [B, T] segment ends over valid tokens, with each response's last
valid token an end. They are registered by name in `openrlhf_sapo.config.SEGMENTERS` (one row: the
function, its inputs and options, from which the CLI flags and defaults derive); `segment_ends(name,
...)` is the one entry point the trainers use.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch

from ..config import SEGMENTERS, SAPO_DEFAULTS
from ._checks import check_float, check_mask, check_positive, check_positive_int, topk_fraction
from .segments import close_last_segment

DEFAULT_STEP_PATTERN = SAPO_DEFAULTS["step_pattern"]


def entropy_segment_ends(entropy: torch.Tensor, action_mask: torch.Tensor, topk_percent: float = 30.0) -> torch.Tensor:
    """The k = max(ceil(n * p / 100), 1) highest-entropy valid tokens of each response end a segment.

    k is computed in integers (n = 10, p = 30 -> 3 exactly); ties go to the lowest index.
    """
    fraction = topk_fraction(topk_percent)
    mask = check_mask(action_mask)
    entropy = check_float(entropy, "entropy", mask)
    n_valid = mask.long().sum(dim=1, keepdim=True)
    k = (-((-n_valid * fraction.numerator) // fraction.denominator)).clamp(min=1)
    if mask.numel() == 0:
        return mask.clone()
    scores = entropy.masked_fill(~mask, float("-inf"))
    # The k-th largest entropy of each row, from one top-k over the largest k (cheaper than a sort).
    top = torch.topk(scores, int(k.max()), dim=1, sorted=True).values
    threshold = top.gather(1, k - 1)
    above = scores > threshold
    # Among tokens tied at the threshold, the lowest indices fill the remaining slots.
    tied = scores == threshold
    slots = k - above.sum(dim=1, keepdim=True)
    ends = above | (tied & (tied.long().cumsum(dim=1) <= slots))
    return close_last_segment(ends, mask)


def newline_segment_ends(token_ids: torch.Tensor, action_mask: torch.Tensor, newline_table: torch.Tensor) -> torch.Tensor:
    """A token whose text contains a newline closes its segment.

    `newline_table` is bool [vocab]: built once per tokenizer by `newline_token_table`.
    """
    mask = check_mask(action_mask)
    token_ids = _check_token_ids(token_ids, mask)
    if not isinstance(newline_table, torch.Tensor) or newline_table.dtype != torch.bool or newline_table.dim() != 1:
        raise ValueError("newline_table must be a 1-D bool tensor over the vocabulary; build it with newline_token_table")
    if bool((token_ids[mask] >= newline_table.numel()).any()):
        raise ValueError(f"token_ids exceed newline_table's vocabulary size {newline_table.numel()}")
    table = newline_table.to(token_ids.device)
    return close_last_segment(table[token_ids.clamp(0, table.numel() - 1)], mask)


def step_segment_ends(
    token_ids: torch.Tensor,
    action_mask: torch.Tensor,
    token_texts: Sequence[str],
    pattern: str = DEFAULT_STEP_PATTERN,
) -> torch.Tensor:
    """Cut before each match of a step-marker regex in the decoded response.

    All responses are joined into one string (a NUL column separates rows so no match spans
    two responses) and scanned once; match offsets map back to tokens with searchsorted.
    The token holding a match's first character starts a segment, so the valid token before
    it ends one.
    """
    mask = check_mask(action_mask)
    token_ids = _check_token_ids(token_ids, mask)
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ValueError(f"step pattern {pattern!r} is not a valid regex: {err}") from None
    B, T = mask.shape
    texts = np.asarray(list(token_texts) + [""], dtype=object)  # last entry: text of padding
    ids = torch.where(mask, token_ids, torch.full_like(token_ids, len(texts) - 1)).cpu().numpy()
    if ids.size and ids.max() >= len(texts):
        raise ValueError(f"token_ids exceed token_texts' vocabulary size {len(texts) - 1}")
    separator = np.empty((B, 1), dtype=object)
    separator.fill("\0")  # not np.full: numpy strips NUL characters from the fill string
    pieces = np.concatenate([texts[ids], separator], axis=1).ravel()
    char_end = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=pieces.size))
    match_starts = np.fromiter((m.start() for m in regex.finditer("".join(pieces))), dtype=np.int64)
    flat = np.searchsorted(char_end, match_starts, side="right")
    row, col = flat // (T + 1), flat % (T + 1)
    keep = col < T
    cut_before = torch.zeros(B, T, dtype=torch.bool)
    cut_before[torch.from_numpy(row[keep]), torch.from_numpy(col[keep])] = True
    return close_last_segment(_end_before(cut_before.to(mask.device) & mask, mask), mask)


def lowprob_segment_ends(
    log_probs: torch.Tensor, action_mask: torch.Tensor, threshold: float = 0.9, every_k: int = 4
) -> torch.Tensor:
    """SPO-style cut points: tokens sampled with probability < threshold; every k-th one ends a segment."""
    mask = check_mask(action_mask)
    log_probs = check_float(log_probs, "log_probs", mask)
    threshold = check_positive(threshold, "threshold")
    every_k = check_positive_int(every_k, "every_k")
    cut_point = mask & (log_probs < float(np.log(threshold)))
    count = cut_point.long().cumsum(dim=1)
    return close_last_segment(cut_point & (count % every_k == 0), mask)


def fixed_segment_ends(action_mask: torch.Tensor, length: int = 64) -> torch.Tensor:
    """Every `length`-th valid token ends a segment: a control with no semantics."""
    mask = check_mask(action_mask)
    length = check_positive_int(length, "length")
    rank = mask.long().cumsum(dim=1)
    return close_last_segment(mask & (rank % length == 0), mask)


# ---------------------------------------------------------------- vocabulary tables


def token_text_table(tokenizer) -> list:
    """The decoded text of every token id (one pass over the vocabulary, once per run)."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def newline_token_table(token_texts: Sequence[str]) -> torch.Tensor:
    """bool [vocab]: which token ids decode to text containing a newline."""
    return torch.tensor(["\n" in text for text in token_texts], dtype=torch.bool)


# ---------------------------------------------------------------- registry


@dataclass(frozen=True)
class Segmenter:
    fn: Callable[..., torch.Tensor]
    needs: Tuple[str, ...]  # per-batch tensors the segmenter reads besides action_mask
    options: Tuple[str, ...]  # keyword options it accepts: vocabulary tables, then its own options


def get_segmenter(name: str) -> Segmenter:
    """The registered segmenter `name` (openrlhf_sapo.config.SEGMENTERS), its function imported."""
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {sorted(SEGMENTERS)}")
    spec = SEGMENTERS[name]
    module, _, function = spec.function.partition(":")
    fn = getattr(importlib.import_module(module), function)
    return Segmenter(fn, spec.needs, spec.vocabulary + tuple(o.argument for o in spec.options))


def segment_ends(
    name: str,
    action_mask: torch.Tensor,
    *,
    entropy: Optional[torch.Tensor] = None,
    log_probs: Optional[torch.Tensor] = None,
    token_ids: Optional[torch.Tensor] = None,
    **options,
) -> torch.Tensor:
    """Run the segmenter `name` on a batch; options it does not know are an error, not ignored."""
    segmenter = get_segmenter(name)
    available = {"entropy": entropy, "log_probs": log_probs, "token_ids": token_ids}
    missing = [need for need in segmenter.needs if available[need] is None]
    if missing:
        raise ValueError(f"segmenter {name!r} needs {', '.join(missing)}; pass it to segment_ends")
    unknown = sorted(set(options) - set(segmenter.options))
    if unknown:
        raise ValueError(f"segmenter {name!r} takes options {list(segmenter.options)}, got unknown {unknown}")
    inputs = {need: available[need] for need in segmenter.needs}
    return segmenter.fn(action_mask=action_mask, **inputs, **options)


# ---------------------------------------------------------------- helpers


def _check_token_ids(token_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError("token_ids must be an integer tensor [B, T] of response token ids")
    if token_ids.shape != mask.shape:
        raise ValueError(f"token_ids has shape {tuple(token_ids.shape)} but action_mask has {tuple(mask.shape)}")
    if bool((token_ids[mask] < 0).any()):
        raise ValueError("token_ids must be >= 0 on valid tokens")
    return token_ids.long()


def _end_before(cut_before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mark the valid token preceding each cut (cuts before a response's first token are dropped)."""
    rank = mask.long().cumsum(dim=1)  # 1..n on valid tokens
    by_rank = torch.zeros(mask.shape[0], mask.shape[1] + 1, dtype=torch.long, device=mask.device)
    by_rank.scatter_add_(1, (rank - 1).clamp(min=0), (cut_before & mask).long())
    return mask & (by_rank.gather(1, rank) > 0)
