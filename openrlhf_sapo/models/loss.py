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

`SoftAdaptivePolicyLoss` is a baseline of another algorithm that shares the acronym: Qwen's Soft
Adaptive Policy Optimization (`--actor.policy_loss_type soft_adaptive`, algo/soft_adaptive.py).
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch

from ..algo.losses import LOG_RATIO_CLAMP, LOG_RATIOS
from ..algo.soft_adaptive import TAU_NEG, TAU_POS, soft_gate, soft_gate_weight
from ..config import RATIOS, SOFT_ADAPTIVE
from .. import OPENRLHF_VERSION
from ..upstream import UpstreamMismatch, upstream

PolicyLoss = upstream("openrlhf.models.loss", "PolicyLoss")
aggregate_loss = upstream("openrlhf.models.loss", "aggregate_loss")
masked_mean = upstream("openrlhf.models.utils", "masked_mean")



def upstream_settings(loss: PolicyLoss, who: str) -> dict:
    """Every setting of an upstream PolicyLoss: each argument of upstream's constructor read back from the
    attribute of the same name, so an option upstream adds is carried over (or refused here, naming it)
    rather than silently reset to its default."""
    settings = {}
    for name in inspect.signature(PolicyLoss.__init__).parameters:
        if name == "self":
            continue
        if not hasattr(loss, name):
            raise UpstreamMismatch(
                f"OpenRLHF's PolicyLoss takes `{name}` but does not keep it as an attribute, so {who} cannot copy it; "
                f"openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION} (models/loss.py upstream_settings)")
        settings[name] = getattr(loss, name)
    return settings


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
        """A SegmentPolicyLoss with every setting of an upstream PolicyLoss (upstream_settings)."""
        return cls(**upstream_settings(loss, "SAPO's loss"), ratio=ratio)

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
            # the pure loss's own ratio (algo.losses), without its input checks: this runs every micro-batch
            segment = LOG_RATIOS["segment"](log_ratio.float(), mask, segment_ends.to(mask.device) & mask)
            log_probs = old_log_probs + segment.to(log_probs.dtype)
        return super().forward(log_probs, old_log_probs, advantages, action_mask, *args, **kwargs)


class SoftAdaptivePolicyLoss(PolicyLoss):
    """Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347; verl and TRL call it "SAPO"), a baseline:
    upstream's token ratio and aggregation (token or sequence level, global token normalisation across
    data-parallel ranks), with the soft gate of algo/soft_adaptive.py in place of the clip. The clip and
    dual-clip settings are unused; `ppo_clip_ratio` logs the fraction of tokens whose gate keeps less than
    half of PPO's on-policy gradient."""

    def __init__(self, *args, tau_pos: float = TAU_POS, tau_neg: float = TAU_NEG, **kwargs):
        super().__init__(*args, **kwargs)
        if self.policy_loss_type != SOFT_ADAPTIVE:
            raise ValueError(f"SoftAdaptivePolicyLoss is --actor.policy_loss_type {SOFT_ADAPTIVE}, "
                             f"got {self.policy_loss_type!r}")
        if self.is_correction_level != "off":
            raise ValueError("--actor.policy_loss_type soft_adaptive does not implement vLLM IS correction; drop "
                             "--algo.advantage.is_correction_level (or use ppo)")
        if not (tau_pos > 0 and tau_neg > 0):
            raise ValueError(f"Soft Adaptive PO's temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
        self.tau_pos, self.tau_neg = float(tau_pos), float(tau_neg)

    @classmethod
    def like(cls, loss: PolicyLoss, tau_pos: float = TAU_POS, tau_neg: float = TAU_NEG) -> "SoftAdaptivePolicyLoss":
        return cls(**upstream_settings(loss, "the soft adaptive loss"), tau_pos=tau_pos, tau_neg=tau_neg)

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None, dp_size=1,
                batch_num_tokens=None, global_batch_size=None):
        raw_log_ratio = log_probs - old_log_probs
        ratio = raw_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
        loss = -soft_gate(ratio, advantages, self.tau_pos, self.tau_neg) * advantages
        loss = aggregate_loss(loss, action_mask, token_level_loss=self.token_level_loss, dp_size=dp_size,
                              batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
        weight = soft_gate_weight(ratio.detach(), advantages, self.tau_pos, self.tau_neg)
        damped = masked_mean((weight < 0.5).float(), action_mask, dim=None)
        ppo_kl = masked_mean(-raw_log_ratio.detach(), action_mask, dim=None)
        return loss, damped, ppo_kl, None, None
