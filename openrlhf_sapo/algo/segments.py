"""Segment bookkeeping: from per-token segment ends to segment ids, sums, means and reads.

Layout. Token tensors are [B, T] over response tokens. A "segment-space" tensor is
[B, T + 1]: column m < T holds segment m of the row (a row has at most T segments; columns
past its segment count are 0) and column T is a dump that collects the invalid tokens, so no
reduction needs a mask and every broadcast back reads 0 for them. Each reduction is one
scatter and each broadcast one gather: nothing loops over samples, and autograd flows
through both.
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
    """long [B, T]: the segment of each valid token (number of ends before it); T for invalid tokens.

    `segment_ends` must already be restricted to valid tokens. Tokens after a row's last end
    form one more segment, so grouping does not need the last valid token to be an end.
    """
    ends = segment_ends.long()
    return (ends.cumsum(dim=1) - ends).masked_fill_(~action_mask, action_mask.shape[1])


def segment_sum(x: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Segment-space [B, T + 1] sums of x; column T (invalid tokens) is zeroed."""
    out = x.new_zeros(x.shape[0], x.shape[1] + 1).scatter_add_(1, seg_ids, x)
    out[:, -1] = 0
    return out


def to_tokens(seg_x: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    """Broadcast segment-space [B, T + 1] values (dump column 0) back to the tokens: 0 on invalid tokens."""
    return seg_x.gather(1, seg_ids)


def segment_lengths(seg_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Segment-space float count of valid tokens per segment (0 past the row's last segment)."""
    return segment_sum(torch.ones(seg_ids.shape, device=seg_ids.device, dtype=dtype), seg_ids)


class SegmentAverage(torch.autograd.Function):
    """Per token, the mean of x over its segment's valid tokens (0 on invalid tokens).

    Averaging within segments is a symmetric projection (P[t, u] = 1/|z| when t, u share a
    segment z), so its backward is the same averaging applied to the gradient: one scatter and
    one gather each way, and nothing saved but the layout.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
        inv_length = segment_lengths(seg_ids, x.dtype).clamp_(min=1).reciprocal_()
        ctx.save_for_backward(seg_ids, inv_length)
        return to_tokens(segment_sum(x, seg_ids).mul_(inv_length), seg_ids)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        seg_ids, inv_length = ctx.saved_tensors
        return to_tokens(segment_sum(grad.contiguous(), seg_ids).mul_(inv_length), seg_ids), None


def segment_average(x: torch.Tensor, seg_ids: torch.Tensor) -> torch.Tensor:
    return SegmentAverage.apply(x, seg_ids)


def segment_starts(action_mask: torch.Tensor, segment_ends: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: the first valid token of every segment (the paper's s_m = (x, y_<b_m))."""
    seg_ids = segment_ids(action_mask, segment_ends)
    B, T = action_mask.shape
    position = torch.arange(T, device=action_mask.device).expand(B, T)
    first = torch.full((B, T + 1), T, device=action_mask.device, dtype=torch.long)
    first.scatter_reduce_(1, seg_ids, position, reduce="amin")
    return action_mask & (first.gather(1, seg_ids) == position)


def value_read_positions(action_mask: torch.Tensor, segment_ends: torch.Tensor, value_at: str) -> torch.Tensor:
    """bool [B, T]: the one token per segment whose critic value stands for the segment."""
    return segment_ends if value_at == "end" else segment_starts(action_mask, segment_ends)
