"""Segment bookkeeping: from per-token segment ends to segment ids, sums, means and reads.

Layout. Token tensors are [B, T] over response tokens. A "segment-space" tensor is also
[B, T], but column m holds segment m of the row (rows have at most T segments; columns past
a row's segment count are 0). Every reduction is one scatter over [B, T] and every
broadcast back one gather, so nothing loops over samples and autograd flows through both.
"""

from __future__ import annotations

import torch


def last_valid_token(action_mask: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the last valid token of each response (none for an empty response)."""
    rank = action_mask.long().cumsum(dim=1)
    return action_mask & (rank == rank[:, -1:])


def close_last_segment(segment_ends: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Ends restricted to valid tokens, plus each response's last valid token (spec 1)."""
    return (segment_ends | last_valid_token(action_mask)) & action_mask


def segment_ids(action_mask: torch.Tensor, segment_ends: torch.Tensor) -> torch.Tensor:
    """long [B, T]: index of the segment each token belongs to (number of ends strictly before it).

    Invalid tokens get an in-range id too (< T) so they can be scattered with zero weight.
    """
    ends = segment_ends.long()
    return ends.cumsum(dim=1) - ends


def segment_sum(x: torch.Tensor, action_mask: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Segment-space sum of x over the valid tokens of each segment."""
    weighted = torch.where(action_mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.zeros_like(weighted).scatter_add(1, seg_ids, weighted)


def to_tokens(seg_x: torch.Tensor, action_mask: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Broadcast a segment-space tensor back to the tokens of each segment (0 on invalid tokens)."""
    per_token = seg_x.gather(1, seg_ids)
    return torch.where(action_mask, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))


def segment_lengths(action_mask: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Segment-space count of valid tokens per segment (float, 0 past the row's last segment)."""
    return segment_sum(action_mask.float(), action_mask, seg_ids)


def segment_starts(action_mask: torch.Tensor, segment_ends: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the first valid token of every segment (the paper's s_m = (x, y_<b_m))."""
    seg_ids = segment_ids(action_mask, segment_ends)
    T = action_mask.shape[1]
    position = torch.arange(T, device=action_mask.device).expand_as(seg_ids)
    # Invalid tokens get position T, so they never win the min.
    position = torch.where(action_mask, position, torch.full_like(position, T))
    first = torch.full_like(position, T).scatter_reduce(1, seg_ids, position, reduce="amin", include_self=True)
    return action_mask & (first.gather(1, seg_ids) == position)


def value_read_positions(action_mask: torch.Tensor, segment_ends: torch.Tensor, value_at: str) -> torch.Tensor:
    """bool [B, T]: the one token per segment whose critic value stands for the segment."""
    return segment_ends if value_at == "end" else segment_starts(action_mask, segment_ends)
