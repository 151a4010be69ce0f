"""SAPO's critic side (the counterpart of openrlhf/trainer/ray/ppo_critic.py).

The critic is trained where segment values are read (paper Eq. 10): segment ends, or
starts with `--algo.sapo.value_at start`. The critic worker's copy of each experience gets
that boundary mask as its action_mask before it enters the replay buffer, so upstream's
ValueLoss, its global token normalisation (also across DP ranks and dynamic batches) and its
logged `values` all run over the boundary tokens. The critic's forward reads only the mask's
width, so values still come out for every position.
"""

from __future__ import annotations

from ...algo.segments import value_read_positions
from ...seam import sapo_remote_class, upstream
from ..ppo_utils.experience_maker import sapo_options

CriticModelActor = upstream("openrlhf.trainer.ray.ppo_critic", "CriticModelActor")


def to_boundary_experience(experience, value_at: str):
    """Replace the experience's action_mask by the tokens whose values the segment GAE read."""
    if getattr(experience, "segment_ends", None) is None:
        raise RuntimeError("the SAPO critic got an experience without segment_ends (not made by SegmentExperienceMaker)")
    mask = experience.action_mask.bool()
    experience.action_mask = value_read_positions(mask, experience.segment_ends.bool() & mask, value_at)
    return experience


class SapoCriticModelActorMixin:
    def append(self, experience):
        args = self.trainer.args
        if args.algo.advantage.estimator == "sapo":
            experience = to_boundary_experience(experience, sapo_options(args)["value_at"])
        return super().append(experience)


SapoCriticModelActor = sapo_remote_class(CriticModelActor, SapoCriticModelActorMixin)
