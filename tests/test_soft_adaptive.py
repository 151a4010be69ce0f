"""Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347), the baseline that verl and TRL call "sapo":
the gate's published form and defaults, its agreement with PPO on-policy, upstream's aggregation, the
flag, and a clear refusal to mix it with this project's SAPO."""

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sapo import patches
from openrlhf_sapo.algo.soft_adaptive import TAU_NEG, TAU_POS, soft_adaptive_policy_loss, soft_gate, soft_gate_weight

patches.apply_patches()

from openrlhf.models.loss import PolicyLoss  # noqa: E402

from openrlhf_sapo.cli import train_ppo_ray as cli  # noqa: E402
from openrlhf_sapo.models.loss import SegmentPolicyLoss, SoftAdaptivePolicyLoss  # noqa: E402
from openrlhf_sapo.trainer.ray.ppo_actor import actor_loss_for  # noqa: E402

BASE = ["--actor.model_name_or_path", "actor", "--reward.model_name_or_path", "rm", "--vllm.num_engines", "1"]


def batch(seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1, 5:] = mask[3, 2:] = False
    old = -torch.rand(4, 7, generator=g)
    new = (old + spread * torch.randn(4, 7, generator=g)).requires_grad_()
    adv = torch.randn(4, 7, generator=g)
    return new, old, adv, mask


def test_the_gate_is_the_papers():
    assert (TAU_POS, TAU_NEG) == (1.0, 1.05)
    r = torch.tensor([0.5, 1.0, 1.5, 1.5])
    a = torch.tensor([1.0, -1.0, 1.0, -1.0])
    tau = torch.tensor([1.0, 1.05, 1.0, 1.05])
    torch.testing.assert_close(soft_gate(r, a), torch.sigmoid(tau * (r - 1)) * 4 / tau)
    weight = soft_gate_weight(r, a)
    assert weight[1] == pytest.approx(1.0)  # on-policy: PPO's gradient
    assert weight[3] < weight[2] < 1.0  # off-policy updates damped, negative advantages faster


def test_on_policy_gradient_equals_ppo():
    """At r = 1 the gate's slope is 1: the same gradient as PPO's clipped surrogate."""
    _, old, adv, mask = batch()
    ours_in = old.clone().requires_grad_()
    theirs_in = old.clone().requires_grad_()
    ours = soft_adaptive_policy_loss(ours_in, old, adv, mask)
    theirs = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)(theirs_in, old, adv, action_mask=mask)[0]
    torch.testing.assert_close(torch.autograd.grad(ours, ours_in)[0], torch.autograd.grad(theirs, theirs_in)[0])


def test_far_off_policy_tokens_get_almost_no_gradient():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.0, 8.0]])).requires_grad_()  # r = 1 and r = 8
    adv = torch.ones(1, 2)
    grad = torch.autograd.grad(soft_adaptive_policy_loss(new, old, adv, torch.ones(1, 2, dtype=torch.bool)), new)[0]
    assert grad[0, 1].abs() < 0.05 * grad[0, 0].abs()  # 4 sigmoid'(7) * 8 = 3%


@pytest.mark.parametrize("token_level", [True, False])
def test_upstream_loss_class_matches_the_algorithm_and_aggregates_as_upstream(token_level):
    new, old, adv, mask = batch(1)
    loss_fn = SoftAdaptivePolicyLoss(policy_loss_type="soft_adaptive", token_level_loss=token_level)
    loss, damped, ppo_kl, vllm_kl, filtered = loss_fn(new, old, adv, action_mask=mask)
    if token_level:
        torch.testing.assert_close(loss, soft_adaptive_policy_loss(new, old, adv, mask))
    else:  # sequence level: the mean of per-response token means
        per_token = -soft_gate((new - old).exp(), adv) * adv
        expected = torch.stack([per_token[i][mask[i]].mean() for i in range(4)]).mean()
        torch.testing.assert_close(loss, expected)
    assert 0.0 <= float(damped) <= 1.0 and vllm_kl is None and filtered is None
    torch.testing.assert_close(ppo_kl, -((new - old).detach()[mask]).mean())
    # upstream's global token normalisation across data-parallel ranks
    half = loss_fn(new, old, adv, action_mask=mask, dp_size=2, batch_num_tokens=2 * float(mask.sum()))[0]
    if token_level:
        torch.testing.assert_close(half, loss)


def test_loss_selection_and_settings():
    upstream_loss = PolicyLoss(clip_eps_low=0.1, clip_eps_high=0.3, policy_loss_type="soft_adaptive", token_level_loss=False)
    args = SimpleNamespace(algo=SimpleNamespace(advantage=SimpleNamespace(estimator="group_norm")),
                           actor=SimpleNamespace(policy_loss_type="soft_adaptive", soft_adaptive_tau_pos=0.5,
                                                 soft_adaptive_tau_neg=2.0))
    chosen = actor_loss_for(args, upstream_loss)
    assert isinstance(chosen, SoftAdaptivePolicyLoss) and (chosen.tau_pos, chosen.tau_neg) == (0.5, 2.0)
    assert chosen.token_level_loss is False and chosen.clip_eps_low == 0.1
    args.actor.policy_loss_type = "ppo"
    assert actor_loss_for(args, upstream_loss) is upstream_loss
    with pytest.raises(ValueError, match="IS correction"):
        SoftAdaptivePolicyLoss(policy_loss_type="soft_adaptive", is_correction_level="token")
    with pytest.raises(ValueError, match="soft_adaptive"):
        SegmentPolicyLoss(policy_loss_type="soft_adaptive")


def test_the_flag_and_its_refusals():
    args = cli.parse_args([*BASE, "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4",
                           "--actor.policy_loss_type", "soft_adaptive"], run_preflight=False)
    assert args.actor.policy_loss_type == "soft_adaptive"
    assert (args.actor.soft_adaptive_tau_pos, args.actor.soft_adaptive_tau_neg) == (1.0, 1.05)
    assert "Soft Adaptive Policy Optimization" in " ".join(cli.build_parser().format_help().split())


@pytest.mark.parametrize("flags, message", [
    (["--algo.advantage.estimator", "sapo", "--actor.policy_loss_type", "soft_adaptive"],
     "a different algorithm from this project's SAPO"),
    (["--actor.policy_loss_type", "soft_adaptive", "--actor.soft_adaptive_tau_neg", "0"], "must be > 0"),
    (["--actor.policy_loss_type", "soft_adaptive", "--algo.advantage.is_correction_level", "token"],
     "does not implement vLLM IS correction"),
])
def test_refused_combinations_name_the_fix(flags, message):
    out = subprocess.run([sys.executable, "-m", "openrlhf_sapo.cli.train_ppo_ray", *BASE, *flags, "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-1500:]
