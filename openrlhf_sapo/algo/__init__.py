"""SAPO's algorithm as pure, vectorized torch (no OpenRLHF, Ray or DeepSpeed import).

Read top to bottom, one training step uses:
  1. a segmenter      -> bool [B, T] segment ends            (segmenters.py)
  2. segment_gae      -> per-token advantages and returns    (advantages.py)
  3. masked_whiten    -> whitened, clamped advantages        (advantages.py)
  4. sapo_policy_loss -> segment-ratio clipped surrogate     (losses.py)
  5. sapo_value_loss  -> critic loss at segment boundaries   (losses.py)
  plus segment_statistics and explained_variance for logging (stats.py)
All inputs are [B, T] over response tokens with an action_mask; any float dtype goes in, the
arithmetic runs in promote_types(dtype, float32) (float64 for the GAE scan), as torch's own ops
do: half precision is computed and returned in float32, float64 stays float64.
"""

from .advantages import VALUE_AT, discounted_reverse_cumsum, masked_whiten, segment_gae
from .losses import (
    LOG_RATIOS,
    clipped_surrogate,
    masked_token_mean,
    naive_is_policy_loss,
    sapo_policy_loss,
    sapo_value_loss,
    segment_mean,
)
from .segmenters import (
    DEFAULT_STEP_PATTERN,
    SEGMENTERS,
    Segmenter,
    entropy_segment_ends,
    fixed_segment_ends,
    get_segmenter,
    lowprob_segment_ends,
    newline_segment_ends,
    newline_token_table,
    segment_ends,
    step_segment_ends,
    token_text_table,
)
from .segments import last_valid_token, segment_ids, segment_starts
from .stats import LIFT_QUANTILES, explained_variance, segment_statistics, value_jump_lift, value_jumps

__all__ = [
    "DEFAULT_STEP_PATTERN",
    "LOG_RATIOS",
    "SEGMENTERS",
    "Segmenter",
    "VALUE_AT",
    "clipped_surrogate",
    "discounted_reverse_cumsum",
    "entropy_segment_ends",
    "fixed_segment_ends",
    "get_segmenter",
    "last_valid_token",
    "lowprob_segment_ends",
    "masked_token_mean",
    "masked_whiten",
    "naive_is_policy_loss",
    "newline_segment_ends",
    "newline_token_table",
    "sapo_policy_loss",
    "sapo_value_loss",
    "segment_ends",
    "segment_gae",
    "segment_ids",
    "segment_mean",
    "segment_starts",
    "segment_statistics",
    "explained_variance",
    "LIFT_QUANTILES",
    "value_jump_lift",
    "value_jumps",
    "step_segment_ends",
    "token_text_table",
]
