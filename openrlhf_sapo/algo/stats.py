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
