"""`SegmentExperience`: OpenRLHF's Experience plus the two per-token tensors SAPO keeps.

Upstream batches, splits, pads, concatenates and buffers experiences by iterating
`fields(Experience)`, so an ad-hoc attribute would be dropped on the way; declared as
"step" tensor fields of a subclass, the rollout entropy and the segment ends survive
concatenation, splitting, the replay buffer, dynamic/balanced batching and async mode.
`patches.apply_patches()` makes upstream build this class wherever it builds an Experience.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...upstream import replaces, upstream

Experience = upstream("openrlhf.trainer.ppo_utils.experience", "Experience")
tensor_field = upstream("openrlhf.trainer.ppo_utils.experience", "tensor_field")


@replaces("openrlhf.trainer.ppo_utils.experience", "Experience", also_in=(
    "openrlhf.trainer.ppo_utils",  # package export
    "openrlhf.trainer.ppo_utils.samples_generator",  # builds every rollout sample
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_utils.replay_buffer",
    "openrlhf.trainer.ray.ppo_actor",
    "openrlhf.trainer.ray.ppo_critic",
))  # the defining module: concat/split/make_experience_batch build it
@dataclass
class SegmentExperience(Experience):
    # (B, A) entropy of the rollout policy at the sampling temperature, from the experience forward
    entropy: torch.Tensor = tensor_field("step", default=None)
    # (B, A) bool: tokens that close a segment; computed once, read by advantages, actor and critic
    segment_ends: torch.Tensor = tensor_field("step", default=None)
