"""SAPO's actor loss on top of OpenRLHF's `PolicyLoss` (the counterpart of openrlhf/models/loss.py).

`SegmentPolicyLoss` keeps every piece of upstream's PPO loss (ratio clamp, clipping, dual
clip, IS correction against vLLM's rollout log-probs, token/sequence aggregation, metrics)
and changes only the ratio: each token's log-ratio becomes the mean log-ratio of its segment,
so upstream computes exp(mean) = the segment's geometric-mean ratio s_m (paper Eq. 8-9).
It does that by handing upstream `old_log_probs + segment_mean(clamped log-ratio)` as the new
log-probs: differentiable through the segment mean, and since a mean of values in [-20, 20]
stays there, upstream's own clamp is then a no-op. The token mean of the segment means equals
the token mean of the log-ratios, so upstream's `ppo_kl` metric is unchanged. vLLM IS correction
(`--algo.advantage.is_correction_*`) reads only the old and the rollout log-probs, so its weight
(per token, or per sequence) multiplies each token's segment surrogate as it multiplies PPO's.

The segment ends of the micro-batch are an argument, `segment_ends`; upstream's call site has a
fixed argument list, so the actor trainer adds it there for its training step
(models/utils.py `call_inputs`).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..algo import segment_mean
from ..algo.losses import LOG_RATIO_CLAMP
from ..config import RATIOS
from .. import OPENRLHF_VERSION
from ..upstream import UpstreamMismatch, upstream

PolicyLoss = upstream("openrlhf.models.loss", "PolicyLoss")



class SegmentPolicyLoss(PolicyLoss):
    def __init__(self, *args, ratio: str = "segment", **kwargs):
        if ratio not in RATIOS:
            raise ValueError(f"unknown SAPO ratio {ratio!r}; choose one of {list(RATIOS)}")
        super().__init__(*args, **kwargs)
        if self.policy_loss_type != "ppo":
            raise ValueError(
                f"SAPO computes its own segment ratio; --actor.policy_loss_type {self.policy_loss_type} cannot be "
                "combined with it (use --algo.sapo.ratio segment|token)"
            )
        self.ratio = ratio

    @classmethod
    def like(cls, loss: PolicyLoss, ratio: str = "segment") -> "SegmentPolicyLoss":
        """A SegmentPolicyLoss with every setting of an upstream PolicyLoss: each argument of upstream's
        constructor is read back from the attribute of the same name, so an option upstream adds is
        carried over (or refused here, naming it) rather than silently reset to its default."""
        settings = {}
        for name in inspect.signature(PolicyLoss.__init__).parameters:
            if name == "self":
                continue
            if not hasattr(loss, name):
                raise UpstreamMismatch(
                    f"OpenRLHF's PolicyLoss takes `{name}` but does not keep it as an attribute, so SAPO's loss cannot "
                    f"copy it; openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION} (models/loss.py SegmentPolicyLoss.like)")
            settings[name] = getattr(loss, name)
        return cls(**settings, ratio=ratio)

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, *args,
                segment_ends: Optional[torch.Tensor] = None, **kwargs):
        if self.ratio == "segment":
            if segment_ends is None:
                raise RuntimeError(
                    "SegmentPolicyLoss needs the micro-batch's segment ends (`segment_ends=`); the experience lost "
                    "its segment_ends: was it made by SegmentExperienceMaker?"
                )
            mask = action_mask.bool()
            log_ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
            segment = segment_mean(log_ratio.float(), mask, segment_ends.to(mask.device) & mask)
            log_probs = old_log_probs + segment.to(log_probs.dtype)
        return super().forward(log_probs, old_log_probs, advantages, action_mask, *args, **kwargs)
