"""SAPO's critic side (the counterpart of openrlhf/trainer/ray/ppo_critic.py).

- Boundary critic (paper Eq. 10): the critic is trained where segment values are read
  (segment ends, or starts with `--algo.sapo.value_at start`). The critic worker buffers a
  copy of each experience with that boundary mask as its action_mask, so upstream's ValueLoss, its global token normalisation (also across DP ranks and
  dynamic batches) and its logged `values` all run over the boundary tokens. The critic's
  forward reads only the mask's width, so values still come out for every position.
- VLM critic: the experience forward and the training step hand the critic the same
  multi-modal inputs (pixel values, grid sizes) as the actor; upstream passes none. A text
  critic next to a VLM actor gets the tokens only.
"""

from __future__ import annotations

import dataclasses

from ...algo.segments import value_read_positions
from ...models.utils import call_inputs
from ...models.vlm_critic import vlm_critic_options
from ...utils.vlm_utils import is_vlm_config
from ...upstream import replaces, sapo_remote_class, upstream
from ..ppo_utils.experience_maker import sapo_options

CriticModelActor = upstream("openrlhf.trainer.ray.ppo_critic", "CriticModelActor")
CriticPPOTrainer = upstream("openrlhf.trainer.ray.ppo_critic", "CriticPPOTrainer")
merge_mm_train_inputs = upstream("openrlhf.utils.vlm_utils", "merge_mm_train_inputs")


def to_boundary_experience(experience, value_at: str):
    """A copy of the experience whose action_mask holds the tokens whose values the segment GAE read.

    A copy (sharing every tensor but the mask): the caller's experience may be the actor's too
    (the single-process backend hands both workers the same object)."""
    if getattr(experience, "segment_ends", None) is None:
        raise RuntimeError("the SAPO critic got an experience without segment_ends (not made by SegmentExperienceMaker)")
    mask = experience.action_mask.bool()
    boundary = value_read_positions(mask, experience.segment_ends.bool() & mask, value_at)
    return dataclasses.replace(experience, action_mask=boundary, info=dict(experience.info))


def takes_images(critic) -> bool:
    """Whether the critic (a DeepSpeed engine or the model) is a VLM critic. A text critic next to a VLM
    actor (a cheaper critic) gets the token ids only, image placeholders included."""
    model = getattr(critic, "module", critic)
    return is_vlm_config(getattr(model, "config", None))


@replaces("openrlhf.trainer.ray.ppo_critic", "CriticPPOTrainer")
class SegmentCriticPPOTrainer(CriticPPOTrainer):
    """Upstream's critic trainer; a VLM critic's training forward also gets the images."""

    def training_step(self, experience, *args, **kwargs):
        mm = getattr(experience, "mm_train_inputs", None)
        mm_inputs = merge_mm_train_inputs(mm, experience.sequences.device) if mm and takes_images(self.critic) else {}
        with call_inputs(self.critic, **mm_inputs):  # upstream's critic call passes no images
            return super().training_step(experience, *args, **kwargs)


class SapoCriticModelActorMixin:
    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        freeze = bool(getattr(strategy.args.critic, "freeze_visual_encoder", False))
        with vlm_critic_options(freeze_visual_encoder=freeze):
            return super().init_model_from_pretrained(strategy, *args, **kwargs)

    def forward(self, *args, mm_train_inputs_list=None, **kwargs):
        import torch

        mm_inputs = {}
        if mm_train_inputs_list and takes_images(self.critic):
            mm_inputs = merge_mm_train_inputs(mm_train_inputs_list, torch.cuda.current_device())
        with call_inputs(self.critic, **mm_inputs):
            return super().forward(*args, **kwargs)

    def append(self, experience):
        args = self.trainer.args
        if args.algo.advantage.estimator == "sapo":
            experience = to_boundary_experience(experience, sapo_options(args)["value_at"])
        return super().append(experience)


SapoCriticModelActor = replaces("openrlhf.trainer.ray.ppo_critic", "CriticModelActor", also_in=(
    "openrlhf.cli.train_ppo_ray",))(sapo_remote_class(CriticModelActor, SapoCriticModelActorMixin))
