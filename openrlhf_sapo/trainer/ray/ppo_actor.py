"""SAPO's actor side (the counterpart of openrlhf/trainer/ray/ppo_actor.py).

- `SegmentActorPPOTrainer`: upstream's ActorPPOTrainer whose loss is `SegmentPolicyLoss`
  for the `sapo` estimator; each training step hands the micro-batch's stored segment ends
  to the loss. Installed by `seam.apply_patches()` as `ppo_actor.ActorPPOTrainer`.
- `SapoPolicyModelActor`: upstream's PolicyModelActor whose experience forward can also
  return the rollout entropy, from the same temperature-scaled logits as the old log-probs
  (chunk-wise: models/utils.py `compute_entropy`).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...models.loss import SegmentPolicyLoss
from ...seam import sapo_remote_class, upstream
from ..ppo_utils.experience_maker import sapo_options

ActorPPOTrainer = upstream("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer")
PolicyModelActor = upstream("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor")


class SegmentActorPPOTrainer(ActorPPOTrainer):
    def __init__(self, strategy, *args, **kwargs):
        super().__init__(strategy, *args, **kwargs)
        self.is_sapo = strategy.args.algo.advantage.estimator == "sapo"
        if self.is_sapo:
            self.actor_loss_fn = SegmentPolicyLoss.like(self.actor_loss_fn, ratio=sapo_options(strategy.args)["ratio"])

    def training_step(self, experience, *args, **kwargs):
        if not self.is_sapo:
            return super().training_step(experience, *args, **kwargs)
        if getattr(experience, "segment_ends", None) is None:
            raise RuntimeError(
                "a SAPO training step got an experience without segment_ends: it was not made by "
                "SegmentExperienceMaker, or an upstream batching path dropped the field"
            )
        with self.actor_loss_fn.segments(experience.segment_ends):
            return super().training_step(experience, *args, **kwargs)


class _EntropyCapture:
    """Stands in for `self.actor` during one upstream experience forward: asks the real actor
    for its entropy too (upstream's own path, which handles temperature, packing and ring
    attention; the seam makes its entropy chunked when no gradient is needed), keeps the
    response part, and returns what upstream's forward expects."""

    def __init__(self, actor):
        self._actor = actor
        self.entropy: Optional[torch.Tensor] = None

    def __call__(self, sequences, action_mask, *args, **kwargs):
        log_probs, output = self._actor(
            sequences, action_mask, *args, return_output=True, return_entropy=True, **kwargs
        )
        self.entropy = output.entropy[:, -action_mask.shape[1] :] * action_mask
        return log_probs

    def __getattr__(self, name):
        return getattr(self._actor, name)


class SapoPolicyModelActorMixin:
    """Methods SAPO adds to the actor's Ray worker."""

    def forward(self, *args, return_entropy: bool = False, **kwargs):
        if not return_entropy:
            return super().forward(*args, **kwargs)
        actor, capture = self.actor, _EntropyCapture(self.actor)
        self.actor = capture
        try:
            log_probs = super().forward(*args, **kwargs)
        finally:
            self.actor = actor
        return log_probs, capture.entropy.to("cpu")


SapoPolicyModelActor = sapo_remote_class(PolicyModelActor, SapoPolicyModelActorMixin)
