"""SAPO's actor loss (segment-ratio clipped surrogate, Eq. 8-9, 13) and critic loss (Eq. 10)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from ._checks import check_choice, check_ends, check_float, check_mask, check_nonnegative, check_positive
from .advantages import VALUE_AT
from .segments import segment_average, segment_ids, value_read_positions

LOG_RATIO_CLAMP = 20.0


def masked_token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked tokens of the batch; 0 (not NaN) when there are none."""
    # where, not x * mask: padding may hold inf (huge advantages times a clamped ratio), and inf * 0 = NaN.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / mask.sum().clamp(min=1)


def segment_mean(x: torch.Tensor, action_mask: torch.Tensor, segment_ends: torch.Tensor) -> torch.Tensor:
    """Per token, the mean of x over the valid tokens of its segment (0 on invalid tokens). Differentiable."""
    mask = check_mask(action_mask)
    x = check_float(x, "x", mask)
    ends = check_ends(segment_ends, mask, close=False)
    return segment_average(x, segment_ids(mask, ends))


# ---------------------------------------------------------------- importance ratios
# Each maps the clamped token log-ratio x_t to the per-token log-ratio the surrogate uses.


def token_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """PPO's token ratio (the paper's naive-IS ablation when paired with segment advantages)."""
    return log_ratio


def segment_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """log s_m: the mean token log-ratio of the segment, i.e. the log of the geometric-mean ratio."""
    return segment_average(log_ratio, segment_ids(mask, ends))


def sequence_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence ratio: the whole response as one segment."""
    return segment_average(log_ratio, torch.zeros_like(log_ratio, dtype=torch.long).masked_fill_(~mask, mask.shape[1]))


LOG_RATIOS: Dict[str, Callable[..., torch.Tensor]] = {
    "segment": segment_log_ratio,
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps_low: float,
    clip_eps_high: float,
    dual_clip: Optional[float],
) -> torch.Tensor:
    """Per-token PPO loss max(-A s, -A clip(s)), capped at -A c for A < 0 by the dual clip."""
    neg_adv = -advantages
    loss = torch.maximum(neg_adv * ratio, neg_adv * ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high))
    if dual_clip is not None:
        loss = torch.minimum(loss, neg_adv * dual_clip).where(advantages < 0, loss)
    return loss


def sapo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    segment_ends: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    dual_clip: Optional[float] = 3.0,
    ratio: str = "segment",
) -> torch.Tensor:
    """Token-mean clipped surrogate with the segment geometric-mean ratio s_m.

    The gradient reaches every token of a segment through the mean. `ratio="token"` is the
    naive-IS ablation, `ratio="sequence"` GSPO's ratio. Returns a float32 scalar (float64 for float64 input).
    """
    check_choice(ratio, "ratio", LOG_RATIOS)
    mask = check_mask(action_mask)
    log_probs = check_float(log_probs, "log_probs", mask)
    old_log_probs = check_float(old_log_probs, "old_log_probs", mask)
    advantages = check_float(advantages, "advantages", mask)
    ends = check_ends(segment_ends, mask, close=False)  # the ratio only groups tokens
    clip_eps_low = check_nonnegative(clip_eps_low, "clip_eps_low")
    clip_eps_high = check_nonnegative(clip_eps_high, "clip_eps_high")
    dual_clip = check_positive(dual_clip, "dual_clip", allow_none=True, above=1.0)

    log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio_t = LOG_RATIOS[ratio](log_ratio, mask, ends).exp()
    loss = clipped_surrogate(ratio_t, advantages, clip_eps_low, clip_eps_high, dual_clip)
    return masked_token_mean(loss, mask)


def naive_is_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    segment_ends: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    dual_clip: Optional[float] = 3.0,
) -> torch.Tensor:
    """The paper's naive-IS ablation: segment advantages with the token-level ratio."""
    return sapo_policy_loss(
        log_probs, old_log_probs, advantages, action_mask, segment_ends, clip_eps_low, clip_eps_high, dual_clip, "token"
    )


def sapo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    action_mask: torch.Tensor,
    segment_ends: torch.Tensor,
    clip_eps: Optional[float] = 0.5,
    value_at: str = "end",
) -> torch.Tensor:
    """Clipped value loss 0.5 max((V - R)^2, (V_clip - R)^2) averaged over the tokens where
    the segment value is read: segment ends (`value_at="end"`) or starts (`"start"`)."""
    check_choice(value_at, "value_at", VALUE_AT)
    mask = check_mask(action_mask)
    values = check_float(values, "values", mask)
    old_values = check_float(old_values, "old_values", mask)
    returns = check_float(returns, "returns", mask)
    ends = check_ends(segment_ends, mask)
    clip_eps = check_positive(clip_eps, "clip_eps", allow_none=True)

    loss = (values - returns).pow(2)
    if clip_eps is not None:
        clipped = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        loss = torch.maximum(loss, (clipped - returns).pow(2))
    return 0.5 * masked_token_mean(loss, value_read_positions(mask, ends, value_at))
