"""SAPO_SPEC section 5: the identities, checked against OpenRLHF 0.11.2's own implementations.

Every token its own segment must reproduce upstream's token GAE, PPO ratio and critic loss;
one segment per response must reproduce GSPO's sequence ratio and A = sum(r) - V.
"""

import pytest
import torch

from openrlhf_sapo.algo import (
    entropy_segment_ends,
    fixed_segment_ends,
    last_valid_token,
    sapo_policy_loss,
    sapo_value_loss,
    segment_gae,
)
from openrlhf_sapo.algo.losses import segment_log_ratio  # LOG_RATIOS["segment"]
from openrlhf_sapo.upstream import upstream

PolicyLoss = upstream("openrlhf.models.loss", "PolicyLoss")
ValueLoss = upstream("openrlhf.models.loss", "ValueLoss")
RemoteExperienceMaker = upstream("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker")


def contiguous_batch(seed, B=6, T=24, min_len=0, equal_lengths=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.full((B,), T) if equal_lengths else torch.randint(min_len, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rand = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    return mask, rand


def every_token_ends(mask, how):
    return entropy_segment_ends(torch.rand(mask.shape), mask, 100.0) if how == "entropy100" else fixed_segment_ends(mask, 1)


def one_segment_ends(mask):
    return last_valid_token(mask)


@pytest.mark.parametrize("how", ["entropy100", "fixed1"])
@pytest.mark.parametrize("seed", range(8))
def test_every_token_a_segment_is_token_gae(seed, how):
    mask, rand = contiguous_batch(seed)
    rewards, values = rand(), rand()
    gamma, lambd = [(1.0, 0.99), (0.9, 0.95), (1.0, 1.0), (0.7, 0.0)][seed % 4]
    ends = every_token_ends(mask, how)
    adv, ret = segment_gae(rewards, values, mask, ends, gamma=gamma, lambd=lambd)
    ref_adv, ref_ret = RemoteExperienceMaker.get_advantages_and_returns(
        None, values, rewards, mask.float(), gamma, lambd
    )
    torch.testing.assert_close(adv, ref_adv * mask, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, ref_ret * mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("seed", range(6))
def test_every_token_a_segment_is_ppo_policy_loss(seed, dual_clip):
    mask, rand = contiguous_batch(seed, min_len=1)
    old = rand()
    new = (old + 0.3 * rand()).requires_grad_()
    adv = rand()
    ends = every_token_ends(mask, "fixed1")
    ours = sapo_policy_loss(new, old, adv, mask, ends, 0.2, 0.28, dual_clip)
    (g_ours,) = torch.autograd.grad(ours, new)
    theirs = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip)(new, old, adv, action_mask=mask.float())[0]
    (g_theirs,) = torch.autograd.grad(theirs, new)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(segment_log_ratio(new - old, mask, ends), (new - old) * mask)


@pytest.mark.parametrize("clip_eps", [None, 0.5, 0.1])
@pytest.mark.parametrize("seed", range(4))
def test_every_token_a_segment_is_ppo_value_loss(seed, clip_eps):
    mask, rand = contiguous_batch(seed, min_len=1)
    values, old_values, returns = rand(), rand(), rand()
    ends = every_token_ends(mask, "entropy100")
    for value_at in ("end", "start"):  # with one-token segments, start == end
        ours = sapo_value_loss(values, old_values, returns, mask, ends, clip_eps=clip_eps, value_at=value_at)
        theirs = ValueLoss(clip_eps=clip_eps)(values, old_values, returns, action_mask=mask.float())
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_one_segment_is_gspo_ratio_and_loss(seed):
    # Equal lengths: GSPO's per-sequence aggregation then equals our token mean.
    mask, rand = contiguous_batch(seed, equal_lengths=True)
    old = rand()
    new = (old + 0.05 * rand()).requires_grad_()
    adv = rand()
    ends = one_segment_ends(mask)
    seq_log_ratio = ((new - old) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(segment_log_ratio(new - old, mask, ends), seq_log_ratio.expand_as(new) * mask)
    ours = sapo_policy_loss(new, old, adv, mask, ends, 0.2, 0.28, None)
    theirs = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="gspo")(new, old, adv, action_mask=mask.float())[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, new)[0], torch.autograd.grad(theirs, new)[0], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("lambd", [0.0, 0.95, 1.0])
@pytest.mark.parametrize("seed", range(4))
def test_one_segment_advantage_is_return_minus_value(seed, lambd):
    mask, rand = contiguous_batch(seed)
    rewards, values = rand(), rand()
    ends = one_segment_ends(mask)
    adv, ret = segment_gae(rewards, values, mask, ends, gamma=1.0, lambd=lambd, value_at="end")
    total = (rewards * mask).sum(1, keepdim=True)
    v_last = (values * ends).sum(1, keepdim=True)
    torch.testing.assert_close(adv, (total - v_last).expand_as(adv) * mask)
    torch.testing.assert_close(ret, total.expand_as(ret) * mask)
