"""Input validation shared by the algorithm's public functions.

Every check raises ValueError naming the offending argument and saying how to fix it,
so a bad batch fails at the call site instead of surfacing later as a NaN loss.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_mask(action_mask: torch.Tensor, name: str = "action_mask") -> torch.Tensor:
    """Return the mask as bool [B, T]; accepts bool, integer or 0/1 float tensors."""
    if not isinstance(action_mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, T], got {type(action_mask).__name__}")
    if action_mask.dim() != 2:
        raise ValueError(f"{name} must have shape [B, T], got shape {tuple(action_mask.shape)}")
    if action_mask.dtype == torch.bool:
        return action_mask
    if action_mask.is_complex():
        raise ValueError(f"{name} must be bool, integer or 0/1 float, got dtype {action_mask.dtype}")
    if not bool(((action_mask == 0) | (action_mask == 1)).all()):
        raise ValueError(f"{name} must contain only 0 and 1 (use a bool tensor), found other values")
    return action_mask.bool()


def check_float(x: torch.Tensor, name: str, mask: torch.Tensor, finite: bool = True) -> torch.Tensor:
    """Check x is a float [B, T] tensor shaped like mask; return it in promote_types(dtype, float32).

    Only valid positions must be finite: padding may hold anything (it is never read).
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, T], got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got dtype {x.dtype}")
    if x.shape != mask.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but action_mask has shape {tuple(mask.shape)}; "
            "pass per-token tensors aligned with the response mask"
        )
    if x.device != mask.device:
        raise ValueError(f"{name} is on {x.device} but action_mask is on {mask.device}; move them to one device")
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # float64 stays float64, as in torch ops
    # Fast path, one reduction: a finite sum proves every element finite (NaN or inf would
    # propagate); only a non-finite sum (or an overflow) pays for the element-wise check.
    if finite and not bool(torch.isfinite(x.sum())):
        if not bool(torch.isfinite(x).logical_or(~mask).all()):
            raise ValueError(f"{name} contains NaN or inf on valid (action_mask=1) tokens; check the model outputs")
        # Non-finite padding: zero it before any arithmetic, or 0 * NaN poisons the backward.
        x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x


def check_ends(segment_ends: torch.Tensor, mask: torch.Tensor, close: bool = True) -> torch.Tensor:
    """Segment ends as bool [B, T] restricted to valid tokens.

    With `close`, each response's last valid token is made an end (spec 1). Grouping tokens
    into segments does not need it (tokens after the last end form the final segment by
    themselves), reading one value per segment does.
    """
    if not isinstance(segment_ends, torch.Tensor) or segment_ends.dtype != torch.bool:
        got = segment_ends.dtype if isinstance(segment_ends, torch.Tensor) else type(segment_ends).__name__
        raise ValueError(f"segment_ends must be a bool tensor [B, T] from a segmenter, got {got}")
    if segment_ends.shape != mask.shape:
        raise ValueError(
            f"segment_ends has shape {tuple(segment_ends.shape)} but action_mask has shape {tuple(mask.shape)}"
        )
    if not close:
        return segment_ends & mask
    from .segments import close_last_segment  # local import: segments imports this module

    return close_last_segment(segment_ends, mask)


def check_choice(value: str, name: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {sorted(choices)}")
    return value


def check_unit_interval(value: float, name: str) -> float:
    if not isinstance(value, (int, float)) or not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_positive(value: Optional[float], name: str, allow_none: bool = False, above: float = 0.0) -> Optional[float]:
    if value is None and allow_none:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= above:
        raise ValueError(f"{name} must be a finite number > {above:g}{' or None' if allow_none else ''}, got {value!r}")
    return float(value)


def check_nonnegative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def topk_fraction(topk_percent: float) -> Fraction:
    """topk_percent / 100 as an exact fraction (30.0 -> 3/10) so k = ceil(n * p / 100) is exact."""
    if isinstance(topk_percent, bool) or not isinstance(topk_percent, (int, float)) or not (0 < topk_percent <= 100):
        raise ValueError(f"topk_percent must be in (0, 100], got {topk_percent!r}")
    # The decimal the user meant: 33.3 is 333/10, not the binary float nearest it, and float noise
    # such as 0.010000000000000002 is 1/100 (a bounded denominator also keeps n * p in int64).
    return Fraction(repr(float(topk_percent))).limit_denominator(10**6) / 100
