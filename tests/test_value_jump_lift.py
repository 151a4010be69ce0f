"""Fig. 3's Lift(q): the critic's value jumps at high-entropy tokens against all tokens."""

import torch

from openrlhf_sapo.algo import LIFT_QUANTILES, value_jump_lift, value_jumps


def test_a_value_jump_at_the_uncertain_token():
    values = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0, 7.0]])
    entropy = torch.tensor([[0.1, 0.9, 0.2, 0.3, 0.4, 5.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])  # the last token is padding
    jumps, h = value_jumps(values, entropy, mask)
    torch.testing.assert_close(jumps, torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    lift = value_jump_lift(jumps, h, quantiles=(0.8, 0.0))
    assert lift[0.8] == 4.0  # only t=1 is at or above the 0.8-quantile; mean jump 0.25
    assert lift[0.0] == 1.0  # every token: no lift


def test_matches_a_loop_over_tokens():
    g = torch.Generator().manual_seed(3)
    values, entropy = torch.randn(5, 9, generator=g), torch.rand(5, 9, generator=g)
    mask = torch.arange(9)[None] < torch.tensor([9, 4, 1, 7, 0])[:, None]
    jumps, h = value_jumps(values, entropy, mask)
    pairs = [(abs(float(values[b, t + 1] - values[b, t])), float(entropy[b, t]))
             for b in range(5) for t in range(8) if mask[b, t] and mask[b, t + 1]]
    assert len(pairs) == jumps.numel() == 8 + 3 + 6
    lifts = value_jump_lift(jumps, h)
    for q in LIFT_QUANTILES:
        threshold = torch.quantile(torch.tensor([e for _, e in pairs], dtype=torch.float64), q)
        chosen = [j for j, e in pairs if e >= threshold]
        expected = (sum(chosen) / len(chosen)) / (sum(j for j, _ in pairs) / len(pairs))
        assert abs(float(lifts[q]) - expected) < 1e-5


def test_undefined_is_zero_not_nan():
    flat = value_jumps(torch.ones(2, 4), torch.rand(2, 4), torch.ones(2, 4, dtype=torch.bool))
    assert all(float(v) == 0.0 for v in value_jump_lift(*flat).values())
    empty = value_jumps(torch.ones(2, 1), torch.rand(2, 1), torch.ones(2, 1, dtype=torch.bool))
    assert all(float(v) == 0.0 for v in value_jump_lift(*empty).values())


def test_the_maker_logs_it_for_the_batch():
    from openrlhf_sapo import patches

    patches.apply_patches()
    from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience
    from openrlhf_sapo.trainer.ppo_utils.experience_maker import log_value_jump_lift

    g = torch.Generator().manual_seed(0)
    experiences, entropies = [], []
    for width in (6, 9):  # micro-batches padded to different widths
        mask = torch.ones(3, width, dtype=torch.bool)
        experiences.append(SegmentExperience(action_mask=mask, values=torch.randn(3, width, generator=g), info={}))
        entropies.append(torch.rand(3, width, generator=g))
    log_value_jump_lift(experiences, entropies)
    pooled = value_jump_lift(*(torch.cat(parts) for parts in zip(*[value_jumps(e.values, h, e.action_mask)
                                                                   for e, h in zip(experiences, entropies)])))
    for e in experiences:
        assert e.info["critic/value_jump_lift_q90"].shape == (3,)
        torch.testing.assert_close(e.info["critic/value_jump_lift_q90"][0], pooled[0.9])
    no_critic = [SegmentExperience(action_mask=torch.ones(1, 3, dtype=torch.bool), values=None, info={})]
    log_value_jump_lift(no_critic, [torch.rand(1, 3)])
    assert no_critic[0].info == {}
