"""A baseline, not this project's algorithm: Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347),
which verl, TRL and others also call "SAPO". It keeps the token ratio r_t and GRPO/PPO's advantages and
replaces PPO's hard clip by a smooth gate:

    f(r) = sigmoid(tau (r - 1)) * 4 / tau,   tau = tau_pos where A > 0, tau_neg where A < 0,
    loss = token mean of -f(r_t) A_t.

df/dr = 4 sigmoid'(tau (r - 1)) is 1 at r = 1 (PPO's on-policy gradient) and decays smoothly as r leaves 1,
faster for negative advantages (tau_neg > tau_pos; the paper's defaults 1.0 and 1.05).
Segment-Aligned Policy Optimization (this project) is `--algo.advantage.estimator sapo`.
"""

from __future__ import annotations

import torch

from ..config import SOFT_ADAPTIVE_TAUS
from ._checks import check_float, check_mask, check_positive
from .losses import LOG_RATIO_CLAMP, masked_token_mean

TAU_POS, TAU_NEG = SOFT_ADAPTIVE_TAUS  # the paper's defaults


def soft_gate(ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float = TAU_POS,
              tau_neg: float = TAU_NEG) -> torch.Tensor:
    """f(r) = sigmoid(tau (r - 1)) * 4 / tau with tau chosen per token by the sign of its advantage."""
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    return torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)


def soft_gate_weight(ratio: torch.Tensor, advantages: torch.Tensor, tau_pos: float = TAU_POS,
                     tau_neg: float = TAU_NEG) -> torch.Tensor:
    """df/dr: how much of PPO's on-policy gradient a token keeps (1 at r = 1, -> 0 far off-policy)."""
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    s = torch.sigmoid(tau * (ratio - 1.0))
    return 4.0 * s * (1.0 - s)


def soft_adaptive_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    action_mask: torch.Tensor,
    tau_pos: float = TAU_POS,
    tau_neg: float = TAU_NEG,
) -> torch.Tensor:
    """Token-mean soft-gated surrogate -f(r_t) A_t (Soft Adaptive PO's loss)."""
    mask = check_mask(action_mask)
    log_probs = check_float(log_probs, "log_probs", mask)
    old_log_probs = check_float(old_log_probs, "old_log_probs", mask)
    advantages = check_float(advantages, "advantages", mask)
    tau_pos = check_positive(tau_pos, "tau_pos")
    tau_neg = check_positive(tau_neg, "tau_neg")
    ratio = (log_probs - old_log_probs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    return masked_token_mean(-soft_gate(ratio, advantages, tau_pos, tau_neg) * advantages, mask)
