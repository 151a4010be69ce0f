"""Segment-level GAE (paper Eq. 6-7) and advantage whitening."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..config import VALUE_AT
from ._checks import check_choice, check_ends, check_float, check_mask, check_positive, check_unit_interval
from .segments import segment_ids, segment_sum, to_tokens, value_read_positions

_SCAN_CHUNK = 256


def discounted_reverse_cumsum(x: torch.Tensor, discount: float, chunk: int = _SCAN_CHUNK) -> torch.Tensor:
    """y[:, m] = sum_{j >= m} discount^(j - m) * x[:, j], i.e. y_m = x_m + discount * y_{m+1}.

    A chunked scan: inside a chunk one matmul with the upper-triangular discount matrix, across
    chunks a carried value. T / chunk Python steps instead of T, no discount^(-m) overflow, and
    float64 so the result does not depend on TF32 settings or on the scan order.
    """
    B, M = x.shape
    x64 = x.double()
    width = min(chunk, max(M, 1))
    offsets = torch.arange(width, device=x.device, dtype=torch.float64)
    gap = offsets[None, :] - offsets[:, None]  # gap[i, j] = j - i
    weights = torch.where(gap >= 0, torch.full_like(gap, discount) ** gap.clamp(min=0), torch.zeros_like(gap))
    out = torch.empty_like(x64)
    carry = torch.zeros(B, 1, dtype=torch.float64, device=x.device)
    for start in reversed(range(0, M, width)):
        stop = min(start + width, M)
        n = stop - start
        # y_i = sum_{j >= i in chunk} d^(j-i) x_j + d^(n-i) * carry
        tail = torch.full((n,), discount, dtype=torch.float64, device=x.device) ** (n - offsets[:n])
        out[:, start:stop] = x64[:, start:stop] @ weights[:n, :n].T + carry * tail
        carry = out[:, start : start + 1]
    return out.to(x.dtype)


def segment_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    action_mask: torch.Tensor,
    segment_ends: torch.Tensor,
    gamma: float = 1.0,
    lambd: float = 0.99,
    value_at: str = "end",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-token (advantages, returns) of segment-level GAE, before whitening.

    r_m = sum of token rewards in z_m; V_m = value at z_m's last (end) or first (start) token;
    delta_m = r_m + gamma V_{m+1} - V_m (V_{M+1} = 0); A_m = delta_m + gamma lambd A_{m+1};
    R_m = A_m + V_m; every token of z_m gets (A_m, R_m). Invalid tokens get 0.
    """
    mask = check_mask(action_mask)
    rewards = check_float(rewards, "rewards", mask)
    values = check_float(values, "values", mask)
    ends = check_ends(segment_ends, mask)
    gamma = check_unit_interval(gamma, "gamma")
    lambd = check_unit_interval(lambd, "lambd")
    check_choice(value_at, "value_at", VALUE_AT)

    seg_ids = segment_ids(mask, ends)
    num_segments = int(ends.sum(dim=1).max()) if ends.numel() else 0
    seg_rewards = segment_sum(rewards, seg_ids)[:, :num_segments]
    reads = value_read_positions(mask, ends, value_at)
    seg_values = segment_sum(values * reads, seg_ids)[:, :num_segments]  # one read per segment
    # Columns past a row's last segment are 0, so V_{M+1} = 0 and padding adds nothing.
    next_values = torch.nn.functional.pad(seg_values[:, 1:], (0, 1))
    deltas = seg_rewards + gamma * next_values - seg_values
    seg_advantages = discounted_reverse_cumsum(deltas, gamma * lambd)
    seg_returns = seg_advantages + seg_values

    pad = (0, mask.shape[1] + 1 - num_segments)  # back to [B, T + 1]: zeros, dump column included
    advantages = to_tokens(torch.nn.functional.pad(seg_advantages, pad), seg_ids)
    returns = to_tokens(torch.nn.functional.pad(seg_returns, pad), seg_ids)
    return advantages, returns


def masked_whiten(
    x: torch.Tensor,
    action_mask: torch.Tensor,
    eps: float = 1e-8,
    clamp: Optional[float] = None,
    shift_mean: bool = True,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the valid tokens of the whole batch, var unbiased.

    `clamp` bounds the result to [-clamp, clamp] (the release clamps advantages at 5).
    `shift_mean=False` scales without centring. Invalid tokens are 0; fewer than two valid
    tokens give variance 0 instead of NaN.
    """
    mask = check_mask(action_mask)
    x = check_float(x, "x", mask)
    eps = check_positive(eps, "eps")
    clamp = check_positive(clamp, "clamp", allow_none=True)
    count = mask.sum()
    zero = torch.zeros((), device=x.device)
    valid_x = torch.where(mask, x, zero)
    mean = valid_x.sum() / count.clamp(min=1)
    centred = torch.where(mask, x - mean, zero)
    var = centred.pow(2).sum() / (count - 1).clamp(min=1)
    out = (centred if shift_mean else valid_x) * torch.rsqrt(var + eps)
    if clamp is not None:
        out = out.clamp(-clamp, clamp)
    return out
