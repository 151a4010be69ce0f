"""Bad input fails with a ValueError that names the argument; edge cases stay NaN-free."""

import math

import pytest
import torch

from openrlhf_sapo import algo
from openrlhf_sapo.algo import (
    entropy_segment_ends,
    fixed_segment_ends,
    lowprob_segment_ends,
    masked_whiten,
    newline_segment_ends,
    sapo_policy_loss,
    sapo_value_loss,
    segment_ends,
    segment_gae,
    segment_mean,
    step_segment_ends,
)

B, T = 3, 8


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(T)[None, :] < torch.tensor([[8], [5], [1]])
    ent = torch.rand(B, T, generator=g)
    return mask, ent, entropy_segment_ends(ent, mask)


@pytest.mark.parametrize("p", [0, -5, 100.5, 1e9, float("nan"), True, "30"])
def test_topk_percent_outside_range(batch, p):
    mask, ent, _ = batch
    with pytest.raises(ValueError, match="topk_percent"):
        entropy_segment_ends(ent, mask, p)


@pytest.mark.parametrize("p,n,k", [(30, 10, 3), (30, 7, 3), (30, 1, 1), (10, 3, 1), (100, 9, 9), (33.3, 1000, 333), (12.5, 8, 1), (12.5, 9, 2), (70, 10, 7)])
def test_topk_count_is_exact(p, n, k):
    mask = torch.ones(1, n, dtype=torch.bool)
    ent = torch.linspace(1, 0, n)[None]  # highest entropy first: the last token is an extra end unless k == n
    ends = entropy_segment_ends(ent, mask, p)
    assert int(ends[0, :k].sum()) == k and int(ends.sum()) == k + (k < n)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["entropy", "log_probs", "old_log_probs", "advantages", "rewards", "values"])
def test_non_finite_on_valid_tokens(batch, name, bad):
    mask, ent, ends = batch
    good = torch.zeros(B, T)
    poisoned = good.clone()
    poisoned[1, 2] = float(bad)
    calls = {
        "entropy": lambda x: entropy_segment_ends(x, mask),
        "log_probs": lambda x: sapo_policy_loss(x, good, good, mask, ends),
        "old_log_probs": lambda x: sapo_policy_loss(good, x, good, mask, ends),
        "advantages": lambda x: sapo_policy_loss(good, good, x, mask, ends),
        "rewards": lambda x: segment_gae(x, good, mask, ends),
        "values": lambda x: segment_gae(good, x, mask, ends),
    }
    with pytest.raises(ValueError, match=name):
        calls[name](poisoned)


def test_non_finite_on_padding_is_ignored(batch):
    mask, ent, ends = batch
    garbage = torch.where(mask, torch.zeros(B, T), torch.tensor(float("nan")))
    adv, ret = segment_gae(garbage, garbage, mask, ends)
    loss = sapo_policy_loss(garbage, garbage, garbage, mask, ends)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all() and math.isfinite(loss.item())
    assert torch.equal(entropy_segment_ends(torch.where(mask, ent, torch.tensor(float("nan"))), mask), ends)


def test_wrong_shapes(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="entropy has shape"):
        entropy_segment_ends(ent[:, :-1], mask)
    with pytest.raises(ValueError, match=r"action_mask must have shape \[B, T\]"):
        entropy_segment_ends(ent, mask[0])
    with pytest.raises(ValueError, match="segment_ends has shape"):
        segment_gae(ent, ent, mask, ends[:2])
    with pytest.raises(ValueError, match="values has shape"):
        sapo_value_loss(ent[:2], ent, ent, mask, ends)


def test_wrong_dtypes(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="entropy must be a floating-point tensor"):
        entropy_segment_ends(ent.long(), mask)
    with pytest.raises(ValueError, match="segment_ends must be a bool tensor"):
        segment_gae(ent, ent, mask, ends.long())
    with pytest.raises(ValueError, match="action_mask must contain only 0 and 1"):
        segment_gae(ent, ent, mask.long() * 2, ends)
    with pytest.raises(ValueError, match="action_mask must be a torch.Tensor"):
        segment_mean(ent, mask.tolist(), ends)
    with pytest.raises(ValueError, match="token_ids must be an integer tensor"):
        newline_segment_ends(ent, mask, torch.zeros(4, dtype=torch.bool))


def test_mask_accepts_int_and_float(batch):
    mask, ent, ends = batch
    for m in (mask.long(), mask.float(), mask.int()):
        assert torch.equal(entropy_segment_ends(ent, m), ends)


def test_unknown_choices(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="value_at"):
        segment_gae(ent, ent, mask, ends, value_at="middle")
    with pytest.raises(ValueError, match="value_at"):
        sapo_value_loss(ent, ent, ent, mask, ends, value_at="middle")
    with pytest.raises(ValueError, match="unknown segmenter 'sentence'.*entropy"):
        segment_ends("sentence", mask, entropy=ent)
    with pytest.raises(ValueError, match="ratio"):
        sapo_policy_loss(ent, ent, ent, mask, ends, ratio="segmnt")


def test_registry_reports_missing_inputs_and_unknown_options(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="segmenter 'entropy' needs entropy"):
        segment_ends("entropy", mask)
    with pytest.raises(ValueError, match="unknown.*topk"):
        segment_ends("entropy", mask, entropy=ent, topk=30)
    assert torch.equal(segment_ends("entropy", mask, entropy=ent, topk_percent=30.0), ends)
    assert set(algo.SEGMENTERS) == {"entropy", "newline", "step", "lowprob", "fixed"}


@pytest.mark.parametrize(
    "kwargs,name",
    [({"gamma": 1.5}, "gamma"), ({"gamma": -0.1}, "gamma"), ({"lambd": 2.0}, "lambd"), ({"lambd": float("nan")}, "lambd")],
)
def test_gae_coefficients_in_unit_interval(batch, kwargs, name):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match=name):
        segment_gae(ent, ent, mask, ends, **kwargs)


def test_loss_hyperparameters(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="dual_clip"):
        sapo_policy_loss(ent, ent, ent, mask, ends, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_eps_low"):
        sapo_policy_loss(ent, ent, ent, mask, ends, clip_eps_low=-0.1)
    with pytest.raises(ValueError, match="clip_eps"):
        sapo_value_loss(ent, ent, ent, mask, ends, clip_eps=0.0)
    with pytest.raises(ValueError, match="clamp"):
        masked_whiten(ent, mask, clamp=-1)


def test_segmenter_options(batch):
    mask, ent, ends = batch
    with pytest.raises(ValueError, match="length"):
        fixed_segment_ends(mask, 0)
    with pytest.raises(ValueError, match="every_k"):
        lowprob_segment_ends(ent.log(), mask, 0.5, 0)
    with pytest.raises(ValueError, match="threshold"):
        lowprob_segment_ends(ent.log(), mask, -1.0, 2)
    with pytest.raises(ValueError, match="not a valid regex"):
        step_segment_ends(torch.zeros(B, T, dtype=torch.long), mask, ["a"], pattern="Step (")
    with pytest.raises(ValueError, match="vocabulary size"):
        newline_segment_ends(torch.full((B, T), 7), mask, torch.zeros(4, dtype=torch.bool))


def test_empty_batch_is_finite_and_zero():
    mask = torch.zeros(2, 5, dtype=torch.bool)
    x = torch.randn(2, 5, requires_grad=True)
    ends = entropy_segment_ends(torch.rand(2, 5), mask)
    assert not ends.any()
    adv, ret = segment_gae(x, x, mask, ends)
    loss = sapo_policy_loss(x, x.detach(), x.detach(), mask, ends)
    vloss = sapo_value_loss(x, x.detach(), x.detach(), mask, ends)
    (loss + vloss).backward()
    assert adv.abs().sum() == 0 and ret.abs().sum() == 0 and loss.item() == 0 and vloss.item() == 0
    assert torch.isfinite(x.grad).all() and masked_whiten(x.detach(), mask).abs().sum() == 0
    assert algo.segment_statistics(mask, ends, torch.rand(2, 5))["boundary_entropy_threshold"].tolist() == [0, 0]


def test_zero_width_batch():
    mask = torch.zeros(3, 0, dtype=torch.bool)
    ends = entropy_segment_ends(torch.zeros(3, 0), mask)
    adv, ret = segment_gae(torch.zeros(3, 0), torch.zeros(3, 0), mask, ends)
    assert adv.shape == (3, 0) and sapo_policy_loss(adv, adv, adv, mask, ends).item() == 0


def test_explained_variance():
    from openrlhf_sapo.algo import explained_variance

    gen = torch.Generator().manual_seed(0)
    returns = torch.randn(3, 7, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    values = returns + 0.5 * torch.randn(3, 7, generator=gen)
    values_with_garbage = values.masked_fill(~mask, 1e6)  # padding never counts
    r, v = returns[mask].double(), values[mask].double()
    expected = 1 - (r - v).var() / r.var()
    torch.testing.assert_close(explained_variance(values_with_garbage, returns, mask), expected.float())
    assert float(explained_variance(returns, returns, mask)) == 1.0
    mean = torch.full_like(returns, float(returns[mask].mean()))
    assert abs(float(explained_variance(mean, returns, mask))) < 1e-6
    one = torch.zeros_like(mask)
    one[0, 0] = True
    assert float(explained_variance(values, returns, one)) == 0.0  # fewer than two positions
    assert float(explained_variance(values, torch.ones_like(returns), mask)) == 0.0  # constant targets
