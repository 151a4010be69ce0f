"""Segment statistics for logging (spec section 8)."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ._checks import check_ends, check_float, check_mask
from .segments import last_valid_token, segment_ids, segment_lengths


def segment_statistics(
    action_mask: torch.Tensor, segment_ends: torch.Tensor, entropy: Optional[torch.Tensor] = None
) -> Dict[str, torch.Tensor]:
    """Per-response statistics as (B,) float tensors, so OpenRLHF's logger can average them.

    - segments_per_response, segment_length_mean, segment_length_max;
    - boundary_entropy_threshold (with entropy): the lowest entropy among a response's
      segment ends other than its final token, which ends a segment by construction rather
      than by entropy; the final token's own entropy when it is the only end. NaN-free: empty
      responses give 0 everywhere.
    """
    mask = check_mask(action_mask)
    ends = check_ends(segment_ends, mask)
    seg_ids = segment_ids(mask, ends)
    lengths = segment_lengths(seg_ids)[:, :-1]
    num_segments = ends.sum(dim=1).float()
    stats = {
        "segments_per_response": num_segments,
        "segment_length_mean": mask.sum(dim=1).float() / num_segments.clamp(min=1),
        "segment_length_max": lengths.max(dim=1).values if lengths.numel() else num_segments,
    }
    if entropy is not None:
        entropy = check_float(entropy, "entropy", mask)
        chosen = ends & ~last_valid_token(mask)
        chosen = torch.where(chosen.any(dim=1, keepdim=True), chosen, ends)
        threshold = entropy.masked_fill(~chosen, float("inf")).min(dim=1).values
        stats["boundary_entropy_threshold"] = torch.where(chosen.any(dim=1), threshold, torch.zeros_like(threshold))
    return stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(returns - values) / Var(returns) over the masked positions (a 0-dim float tensor).

    The critic's fit to its regression targets: 1 is perfect, 0 is no better than predicting the
    mean return, negative is worse. 0 when fewer than two positions or the returns are constant
    (nothing to explain), so it is never NaN."""
    mask = check_mask(mask)
    values = check_float(values, "values", mask).double()
    returns = check_float(returns, "returns", mask).double()
    count = mask.sum()
    if count < 2:
        return values.new_zeros((), dtype=torch.float32)
    target = returns[mask]
    target_var = target.var()
    if target_var <= 0:
        return values.new_zeros((), dtype=torch.float32)
    return (1 - (target - values[mask]).var() / target_var).float()


# Fig. 3's entropy quantiles: Lift(q) over the tokens whose entropy is at or above the q-quantile.
LIFT_QUANTILES = (0.5, 0.7, 0.8, 0.9, 0.95)


def value_jumps(values: torch.Tensor, entropy: torch.Tensor, action_mask: torch.Tensor):
    """(|V_{t+1} - V_t|, H_t) for every response token t whose successor is a response token too,
    as two flat float64 vectors (pool them over a batch for `value_jump_lift`)."""
    mask = check_mask(action_mask)
    values = check_float(values, "values", mask).double()
    entropy = check_float(entropy, "entropy", mask).double()
    pairs = mask[:, :-1] & mask[:, 1:]
    return (values[:, 1:] - values[:, :-1]).abs()[pairs], entropy[:, :-1][pairs]


def value_jump_lift(jumps: torch.Tensor, entropies: torch.Tensor,
                    quantiles=LIFT_QUANTILES) -> Dict[float, torch.Tensor]:
    """Lift(q) = E[|V_{t+1} - V_t| | H_t >= the q-quantile of H] / E[|V_{t+1} - V_t|] (paper Fig. 3,
    Appendix C): above 1 when high-entropy tokens sit at value jumps. 0-dim float32 tensors; 0 when
    there is no pair or the values never change (undefined, not NaN)."""
    out = {}
    base = jumps.mean() if jumps.numel() else jumps.new_zeros(())
    for q in quantiles:
        if not jumps.numel() or base <= 0:
            out[q] = torch.zeros((), dtype=torch.float32)
            continue
        selected = entropies >= torch.quantile(entropies, q)
        out[q] = (jumps[selected].mean() / base).float()
    return out
