"""SAPO inside OpenRLHF 0.11.2, exercised through the real upstream classes (no Ray cluster).

What is faked: `torch.cuda.current_device` (upstream's experience forward asks for a CUDA
device) and the Ray groups of the experience maker (its advantage step needs none).
"""

import copy
import types
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sapo import patches
from openrlhf_sapo import upstream as sapo_upstream
from openrlhf_sapo.algo import (
    entropy_segment_ends,
    fixed_segment_ends,
    last_valid_token,
    masked_whiten,
    sapo_value_loss,
    segment_gae,
)
from openrlhf_sapo.models.loss import SegmentPolicyLoss
from openrlhf_sapo.models import utils as models_utils
from openrlhf_sapo.models.utils import chunked_entropy

patches.apply_patches()

from openrlhf.models import Actor  # noqa: E402
from openrlhf.models.loss import PolicyLoss, ValueLoss  # noqa: E402
from openrlhf.models.utils import compute_reward  # noqa: E402
from openrlhf.trainer.ppo_utils import experience as upstream_experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer  # noqa: E402

from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience  # noqa: E402
from openrlhf_sapo.trainer.ppo_utils.experience_maker import SegmentExperienceMaker  # noqa: E402
from openrlhf_sapo.trainer.ray.ppo_actor import SapoPolicyModelActorMixin, SegmentActorPPOTrainer  # noqa: E402
from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActorMixin, to_boundary_experience  # noqa: E402


# ---------------------------------------------------------------- helpers


def tiny_actor(temperature=1.0, vocab=48):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = Qwen2ForCausalLM(config).float().eval()
    actor = Actor(model, temperature=temperature)
    actor.packing_samples = False  # upstream sets it only when it loads the model itself
    return actor


def make_experience(seed, n=3, prompt=4, max_resp=10, with_segments=True, cls=SegmentExperience, first_index=0):
    g = torch.Generator().manual_seed(seed)
    resp_lens = torch.randint(1, max_resp + 1, (n,), generator=g)
    T = prompt + max_resp
    sequences = torch.randint(1, 40, (n, T), generator=g)
    attention_mask = torch.zeros(n, T, dtype=torch.long)
    action_mask = torch.zeros(n, max_resp, dtype=torch.bool)
    for i, length in enumerate(resp_lens.tolist()):
        attention_mask[i, : prompt + length] = 1
        action_mask[i, :length] = True
    entropy = torch.rand(n, max_resp, generator=g) * action_mask
    exp = cls(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        action_log_probs=-torch.rand(n, max_resp, generator=g) * action_mask,
        values=torch.randn(n, max_resp, generator=g) * action_mask,
        kl=0.01 * torch.rand(n, max_resp, generator=g) * action_mask,
        rewards=torch.randint(0, 2, (n,), generator=g).float(),
        response_length=resp_lens.float(),
        total_length=attention_mask.sum(1).float(),
        index=list(range(first_index, first_index + n)),
        info={"reward": torch.zeros(n)},
    )
    if with_segments:
        exp.entropy = entropy
        exp.segment_ends = entropy_segment_ends(entropy, action_mask, 30.0)
    return exp


def make_args(estimator, n_samples=1, **sapo):
    return SimpleNamespace(
        algo=SimpleNamespace(
            advantage=SimpleNamespace(estimator=estimator, gamma=1.0, lambd=0.95, no_std_norm=False, critic_lambd=None),
            sapo=SimpleNamespace(**{"segmenter": "entropy", "topk_percent": 30.0, "value_at": "end", "adv_clip": 5.0, **sapo}),
            kl=SimpleNamespace(use_loss=False, estimator="k1"),
        ),
        rollout=SimpleNamespace(n_samples_per_prompt=n_samples),
        reward=SimpleNamespace(clip_range=(-10, 10), overlong_buffer_len=None, stop_properly_penalty_coef=None),
        train=SimpleNamespace(dynamic_batch_enable=False),
    )


def make_maker(cls, args):
    strategy = SimpleNamespace(args=args)
    return cls(None, None, None, None, SimpleNamespace(value=0.001), strategy, tokenizer=None)


# ---------------------------------------------------------------- patches


def test_patches_rebind_upstream_and_are_idempotent():
    patches.apply_patches()
    patches.apply_patches()
    from openrlhf.trainer.ppo_utils import samples_generator
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    assert upstream_experience.Experience is SegmentExperience
    assert samples_generator.Experience is SegmentExperience
    assert ppo_trainer.RemoteExperienceMaker is SegmentExperienceMaker
    listed = {id(sapo_upstream.upstream(m, a)) for m, a, _ in sapo_upstream.UPSTREAM_SYMBOLS}
    assert len(sapo_upstream.REPLACEMENTS) == 13
    for row in sapo_upstream.REPLACEMENTS:
        for module in row.rebind_in:
            assert getattr(__import__(module, fromlist=[row.attribute]), row.attribute) is row.replacement
        # Every upstream object a patch replaces is one upstream.py lists, and upstream() still finds it.
        assert id(row.original) in listed, row
        assert sapo_upstream.original_of(row.replacement) is row.original
    assert patches.originals_left() == []


def test_rebind_refuses_an_unexpected_upstream_object(monkeypatch):
    import openrlhf.trainer.ppo_trainer as ppo_trainer

    monkeypatch.setattr(ppo_trainer, "RemoteExperienceMaker", object)
    with pytest.raises(sapo_upstream.UpstreamMismatch, match="not the upstream object"):
        sapo_upstream.rebind("openrlhf.trainer.ppo_trainer", "RemoteExperienceMaker", SegmentExperienceMaker,
                             RemoteExperienceMaker)


HOSTILE_ORDER = """
import importlib, pkgutil, sys, types
import openrlhf_sapo.upstream as up
up.prepare()
import openrlhf
for info in pkgutil.walk_packages(openrlhf.__path__, "openrlhf."):  # every upstream module first
    try:
        importlib.import_module(info.name)
    except Exception:
        pass
{probe}
from openrlhf_sapo import patches
try:
    patches.apply_patches()
except up.UpstreamMismatch as err:
    print("REFUSED", err)
else:
    print("APPLIED", len(sys.modules))
"""


@pytest.mark.parametrize("probe", ["", "late"])
def test_the_sweep_catches_a_module_that_kept_an_original(probe):
    """A fresh process imports every upstream module before the patches (the most hostile order):
    the registry's lists cover them all. A module that imported Experience itself and is on no list
    (a stand-in for an upstream module added by a new release) makes apply_patches fail, naming it."""
    import subprocess
    import sys

    code = HOSTILE_ORDER.format(probe="" if not probe else (
        "late = types.ModuleType('openrlhf.trainer.late_module')\n"
        "from openrlhf.trainer.ppo_utils.experience import Experience as _E\n"
        "late.Experience = _E\nsys.modules['openrlhf.trainer.late_module'] = late"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    if probe:
        assert "REFUSED" in out.stdout and "openrlhf.trainer.late_module.Experience" in out.stdout
        assert "also_in" in out.stdout
    else:
        assert "APPLIED" in out.stdout, out.stdout[-2000:]


def test_remote_subclasses_apply_the_patches_in_their_worker(tmp_path):
    """Each SAPO worker class, unpickled in a fresh process as Ray does and built by upstream's own
    __init__, leaves upstream's modules bound to SAPO's classes before any model is loaded; the
    trainers seed their process from --train.seed first (the prompt order of a Ray run)."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    from openrlhf_sapo.trainer.ppo_trainer import SapoPPOTrainer
    from openrlhf_sapo.trainer.ray.ppo_actor import SapoPolicyModelActor

    (tmp_path / "cls.pkl").write_bytes(cloudpickle.dumps(SapoPolicyModelActor.__ray_actor_class__))
    script = f"""
import ray.cloudpickle as cloudpickle
cls = cloudpickle.loads(open({str(tmp_path / "cls.pkl")!r}, "rb").read())
import openrlhf.trainer.ppo_utils.experience as experience
import openrlhf.trainer.ray.ppo_actor as ppo_actor
import openrlhf.models.actor as actor
before = (experience.Experience.__name__, ppo_actor.ActorPPOTrainer.__name__)
cls.__new__(cls).__init__(1, 0, "127.0.0.1", 29556)
print(*before, experience.Experience.__name__, ppo_actor.ActorPPOTrainer.__name__, actor.compute_entropy.__module__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-5:] == ["Experience", "ActorPPOTrainer", "SegmentExperience", "SegmentActorPPOTrainer",
                                       "openrlhf_sapo.models.utils"]
    assert SapoPolicyModelActor._default_options == {"num_gpus": 1}
    # The trainer: seeded from the strategy before upstream's __init__ builds the prompt loader.
    seen = []
    trainer_cls = SapoPPOTrainer.__ray_actor_class__
    base = sapo_upstream.original_of(SapoPPOTrainer).__ray_actor_class__
    original = base.__init__
    try:
        base.__init__ = lambda self, *a, **k: seen.append(torch.rand(1).item())
        strategy = SimpleNamespace(args=SimpleNamespace(train=SimpleNamespace(seed=3)))
        trainer_cls.__new__(trainer_cls).__init__("model", strategy)
        torch.manual_seed(123)
        trainer_cls.__new__(trainer_cls).__init__("model", strategy)
    finally:
        base.__init__ = original
    assert seen[0] == seen[1]  # the same draw whatever the process's RNG state was


# ---------------------------------------------------------------- experience fields


@pytest.fixture
def fake_cuda_index(monkeypatch):
    """NaiveReplayBuffer records `cuda:<current_device()>` as its target at construction."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_new_fields_survive_every_batching_path(fake_cuda_index):
    batch = upstream_experience.Experience.concat_experiences([make_experience(0), make_experience(1)], pad_token_id=0)
    assert isinstance(batch, SegmentExperience) and batch.segment_ends.dtype == torch.bool
    items = upstream_experience.split_experience_batch(copy.deepcopy(batch))
    assert all(isinstance(i, SegmentExperience) for i in items)
    assert torch.equal(items[4].segment_ends, batch.segment_ends[4])
    trimmed = upstream_experience.remove_padding_in_sequences(copy.deepcopy(items))
    rebuilt = upstream_experience.make_experience_batch(trimmed)
    width = rebuilt.action_mask.shape[1]
    assert torch.equal(rebuilt.segment_ends, batch.segment_ends[:, :width])
    assert torch.equal(rebuilt.entropy, batch.entropy[:, :width])

    args = SimpleNamespace(actor=SimpleNamespace(num_nodes=1, num_gpus_per_node=2), ds=SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1))
    balanced = upstream_experience.balance_experiences([copy.deepcopy(batch)], args)
    assert sum(b.segment_ends.sum() for b in balanced) == batch.segment_ends.sum()

    buffer = NaiveReplayBuffer(sample_batch_size=2, cpu_offload=True, packing_samples=False)
    buffer.append(copy.deepcopy(batch))
    collated = buffer.collate_fn([buffer[0], buffer[1]])
    assert collated.segment_ends is not None and collated.segment_ends[0].sum() == batch.segment_ends[0].sum()


# ---------------------------------------------------------------- experience maker


@pytest.mark.parametrize("n_samples", [1, 2])
def test_sapo_with_token_segments_shapes_rewards_as_upstream_gae(n_samples):
    """SAPO's own advantage step with every token a segment is upstream's gae step: the same length
    penalty, KL-shaped clipped token rewards, group reward spread, returns and (centred) advantages."""
    experiences = [make_experience(4), make_experience(5, first_index=3)]
    for exp in experiences:
        exp.segment_ends = fixed_segment_ends(exp.action_mask, 1)
        exp.info["response_length"] = exp.response_length
    theirs = copy.deepcopy(experiences)

    def args(estimator):
        a = make_args(estimator, n_samples, adv_clip=0.0)
        a.algo.advantage.no_std_norm = True
        a.reward.overlong_buffer_len, a.reward.overlong_penalty_factor = 4, 0.5
        a.rollout.max_new_tokens = 10
        return a

    make_maker(SegmentExperienceMaker, args("sapo")).compute_advantages_and_returns(experiences)
    make_maker(RemoteExperienceMaker, args("gae")).compute_advantages_and_returns(theirs)
    for ours, up in zip(experiences, theirs):
        torch.testing.assert_close(ours.rewards, up.rewards)
        torch.testing.assert_close(ours.returns, up.returns)
        valid = ours.action_mask.bool()  # upstream leaves padding at -mean, SAPO's whitening at 0
        torch.testing.assert_close(ours.advantages[valid], up.advantages[valid])
        assert ours.kl is None and up.kl is None
        assert set(ours.info) - set(up.info) == {"critic/explained_variance"}  # SAPO's maker adds it for gae too
        for key in up.info:
            torch.testing.assert_close(ours.info[key], up.info[key])
    assert (n_samples > 1) == ("group_reward_std" in experiences[0].info)
    assert any(not torch.equal(e.rewards, o.rewards) for e, o in zip(experiences, [make_experience(4), make_experience(5)]))


@pytest.mark.parametrize("seed", range(3))
def test_sapo_maker_equals_the_algorithm(seed):
    experiences = [make_experience(seed), make_experience(seed + 10, first_index=3)]
    reference = copy.deepcopy(experiences)
    maker = make_maker(SegmentExperienceMaker, make_args("sapo"))
    maker.compute_advantages_and_returns(experiences)

    advantages, masks = [], []
    for exp, out in zip(reference, experiences):
        reward = compute_reward(exp.rewards.float(), 0.001, exp.kl, action_mask=exp.action_mask, reward_clip_range=(-10, 10))
        adv, ret = segment_gae(reward, exp.values, exp.action_mask, exp.segment_ends, 1.0, 0.95, "end")
        torch.testing.assert_close(out.returns, ret)
        advantages.append(adv.flatten())
        masks.append(exp.action_mask.flatten())
    whitened = masked_whiten(torch.cat(advantages)[None], torch.cat(masks)[None], clamp=5.0)[0]
    torch.testing.assert_close(torch.cat([e.advantages.flatten() for e in experiences]), whitened)


def test_whitened_advantages_own_their_storage():
    """Each experience goes to the actor workers as one Ray object: a view into the batch's whitened
    tensor would pickle the whole batch with every chunk."""
    import pickle

    experiences = [make_experience(20 + i, n=4, max_resp=64, first_index=4 * i) for i in range(8)]
    maker = make_maker(SegmentExperienceMaker, make_args("sapo"))
    maker.compute_advantages_and_returns(experiences)
    own_bytes = experiences[0].advantages.numel() * experiences[0].advantages.element_size()
    pickled = len(pickle.dumps(experiences[0].advantages))
    assert pickled < own_bytes + 1024, f"{pickled} bytes pickled for {own_bytes} bytes of advantages"


@pytest.mark.parametrize("estimator,n", [("gae", 1), ("group_norm", 2), ("rloo", 2), ("reinforce_baseline", 2)])
def test_other_estimators_are_bit_identical_to_upstream(estimator, n):
    experiences = [make_experience(3, n=4, with_segments=False), make_experience(4, n=4, with_segments=False, first_index=4)]
    ours, theirs = copy.deepcopy(experiences), copy.deepcopy(experiences)
    make_maker(SegmentExperienceMaker, make_args(estimator, n)).compute_advantages_and_returns(ours)
    make_maker(RemoteExperienceMaker, make_args(estimator, n)).compute_advantages_and_returns(theirs)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.advantages, b.advantages) and torch.equal(a.returns, b.returns)


def test_vc_ppo_critic_lambda_only_changes_returns():
    experiences = [make_experience(5, with_segments=False)]
    base, vc = copy.deepcopy(experiences), copy.deepcopy(experiences)
    make_maker(SegmentExperienceMaker, make_args("gae")).compute_advantages_and_returns(base)
    args = make_args("gae")
    args.algo.advantage.critic_lambd = 1.0
    make_maker(SegmentExperienceMaker, args).compute_advantages_and_returns(vc)
    assert torch.equal(base[0].advantages, vc[0].advantages)
    exp = experiences[0]
    reward = compute_reward(exp.rewards.float(), 0.001, exp.kl, action_mask=exp.action_mask, reward_clip_range=(-10, 10))
    _, returns = RemoteExperienceMaker.get_advantages_and_returns(None, exp.values, reward, exp.action_mask, 1.0, 1.0)
    torch.testing.assert_close(vc[0].returns, returns)
    assert not torch.allclose(vc[0].returns, base[0].returns)


@pytest.mark.parametrize("segmenter,options", [("fixed", {"fixed_length": 3}), ("lowprob", {"lowprob_threshold": 0.7, "lowprob_every_k": 2})])
def test_maker_segments_with_the_configured_segmenter(segmenter, options):
    exp = make_experience(6, with_segments=False)
    exp.entropy = torch.rand_like(exp.action_log_probs)
    maker = make_maker(SegmentExperienceMaker, make_args("sapo", segmenter=segmenter, **options))
    maker.segment(exp)
    if segmenter == "fixed":
        assert torch.equal(exp.segment_ends, fixed_segment_ends(exp.action_mask, 3))
    assert exp.info["sapo/segments_per_response"].shape == (exp.action_mask.shape[0],)
    assert torch.equal(exp.info["sapo/segments_per_response"], exp.segment_ends.sum(1).float())
    assert "sapo/boundary_entropy_threshold" in exp.info


# ---------------------------------------------------------------- rollout entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_experience_forward_entropy_equals_direct_computation(monkeypatch, temperature):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # upstream's forward asks for CUDA
    cls = type("Actor", (SapoPolicyModelActorMixin, sapo_upstream.upstream("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor").__ray_actor_class__), {})
    worker = cls.__new__(cls)
    worker.actor = tiny_actor(temperature)
    worker.strategy = SimpleNamespace(ring_attn_group=None)
    monkeypatch.setattr(models_utils, "chunked_entropy", lambda logits: chunked_entropy(logits, 5))  # several chunks
    exp = make_experience(7)
    plain = worker.forward(exp.sequences, exp.action_mask, exp.attention_mask)
    log_probs, entropy = worker.forward(exp.sequences, exp.action_mask, exp.attention_mask, return_entropy=True)
    assert worker.actor.__class__.__name__ == "Actor"  # the capture is gone again
    torch.testing.assert_close(log_probs, plain)
    with torch.no_grad():
        position_ids = (exp.attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = worker.actor.model(exp.sequences, attention_mask=exp.attention_mask, position_ids=position_ids)["logits"]
        logits = logits.float()[:, :-1][:, -exp.action_mask.shape[1] :] / temperature
        direct = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1) * exp.action_mask
    torch.testing.assert_close(entropy, direct, rtol=1e-5, atol=1e-5)


def test_chunked_entropy_matches_full_softmax():
    logits = torch.randn(3, 7, 50) * 4
    full = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    for chunk in (1, 4, 21, 1000):
        torch.testing.assert_close(chunked_entropy(logits, chunk), full)
    assert chunked_entropy(logits.bfloat16(), 4).dtype == torch.float32


def test_entropy_wrapper_is_chunked_without_grad_and_differentiable_with_it(monkeypatch):
    import openrlhf.models.actor as upstream_actor

    assert upstream_actor.compute_entropy is models_utils.compute_entropy  # what Actor.forward calls
    calls = []
    monkeypatch.setattr(models_utils, "chunked_entropy", lambda logits: calls.append(1) or chunked_entropy(logits))
    logits = torch.randn(2, 5, 11, requires_grad=True)
    with torch.no_grad():
        models_utils.compute_entropy(logits)
    assert calls == [1]
    entropy = models_utils.compute_entropy(logits)  # upstream's entropy loss needs the gradient
    entropy.sum().backward()
    assert calls == [1] and logits.grad is not None and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- actor loss


@pytest.mark.parametrize("is_level", ["off", "token"])
@pytest.mark.parametrize("seed", range(3))
def test_segment_loss_with_token_segments_is_upstream_ppo(seed, is_level):
    exp = make_experience(seed)
    mask = exp.action_mask
    old = exp.action_log_probs
    new = (old + 0.2 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn_like(old)
    rollout = old + 0.05 * torch.randn_like(old)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, is_correction_level=is_level)
    theirs = PolicyLoss(**kw)(new, old, adv, action_mask=mask, rollout_log_probs=rollout)
    loss = SegmentPolicyLoss(**kw)
    ours = loss(new, old, adv, action_mask=mask, rollout_log_probs=rollout, segment_ends=fixed_segment_ends(mask, 1))
    for a, b in zip(ours, theirs):
        if a is not None:
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(ours[0], new)[0], torch.autograd.grad(theirs[0], new)[0])


def test_segment_loss_with_one_segment_uses_gspo_ratio():
    mask = torch.ones(4, 6, dtype=torch.bool)  # equal lengths: GSPO's per-sequence mean == token mean
    old = -torch.rand(4, 6)
    new = (old + 0.05 * torch.randn_like(old)).requires_grad_()
    adv = torch.randn(4, 1).expand(4, 6).contiguous()
    loss = SegmentPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)
    ours = loss(new, old, adv, action_mask=mask, segment_ends=last_valid_token(mask))[0]
    gspo = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, policy_loss_type="gspo")(new, old, adv, action_mask=mask)[0]
    torch.testing.assert_close(ours, gspo)


def test_segment_loss_refuses_gspo_and_missing_segments():
    with pytest.raises(ValueError, match="policy_loss_type gspo"):
        SegmentPolicyLoss(policy_loss_type="gspo")
    x = torch.zeros(1, 3)
    with pytest.raises(RuntimeError, match="segment ends"):
        SegmentPolicyLoss()(x, x, x, action_mask=torch.ones(1, 3))
    token = SegmentPolicyLoss(ratio="token")  # naive IS: upstream's token ratio, no segments needed
    torch.testing.assert_close(token(x, x, x + 1, action_mask=torch.ones(1, 3))[0], torch.tensor(-1.0))


def test_segment_loss_copies_every_option_of_the_configured_loss():
    """Each argument of upstream's PolicyLoss, set to a value other than its default, reaches SAPO's loss."""
    import inspect

    params = {n: p for n, p in inspect.signature(PolicyLoss.__init__).parameters.items() if n != "self"}
    base = {"clip_eps_low": 0.1, "clip_eps_high": 0.3, "dual_clip": 2.5, "token_level_loss": False, "policy_loss_type": "ppo"}
    configurations = [  # two, since upstream refuses some combinations of the IS-correction options
        {**base, "is_correction_level": "seq", "is_correction_mode": "mask", "is_correction_gating": "binary_kl",
         "is_correction_threshold": (0.0, 0.05)},
        {**base, "is_correction_level": "token", "is_correction_mode": "clip", "is_correction_gating": "ratio",
         "is_correction_threshold": (0.3, 3.0)},
    ]
    assert all(set(params) == set(c) for c in configurations), "upstream's PolicyLoss changed its arguments: extend this test"
    changed = set()
    for options in configurations:
        sapo = SegmentPolicyLoss.like(PolicyLoss(**options), ratio="token")
        assert {n: getattr(sapo, n) for n in params} == options and sapo.ratio == "token"
        changed |= {n for n in params if params[n].default != options[n]}
    assert changed == set(params) - {"policy_loss_type"}  # every option but the loss type was set off its default


@pytest.mark.parametrize("level,mode,gating", [("token", "mask", "ratio"), ("token", "clip", "ratio"),
                                               ("seq", "mask", "ratio"), ("token", "mask", "tv")])
def test_is_correction_weights_the_segment_surrogate_per_token(level, mode, gating):
    """SAPO with vLLM IS correction, multi-token segments: the segment ratio s_m replaces the token ratio
    in the clipped surrogate; upstream's correction weight (from old vs rollout log-probs, which SAPO
    leaves alone) then multiplies each token's loss, as it multiplies PPO's (README, paper vs code)."""
    exp = make_experience(13, n=4)
    mask, old = exp.action_mask, exp.action_log_probs
    g = torch.Generator().manual_seed(1)
    new = (old + 0.3 * torch.randn(old.shape, generator=g)).requires_grad_()
    rollout = old + 0.4 * torch.randn(old.shape, generator=g)
    adv = torch.randn(old.shape, generator=g)
    threshold = (0.0, 0.2) if gating == "tv" else (0.7, 1.4)
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0, is_correction_level=level,
              is_correction_mode=mode, is_correction_gating=gating, is_correction_threshold=threshold)
    ends = exp.segment_ends
    assert (mask.sum(1) > ends.sum(1)).any()  # some segment has several tokens
    loss = SegmentPolicyLoss(**kw)
    ours, clip_ratio, ppo_kl, vllm_kl, filtered = loss(new, old, adv, action_mask=mask, rollout_log_probs=rollout,
                                                       segment_ends=ends)
    assert vllm_kl is not None and filtered is not None

    # The reference: the segment ratio from tests/reference_sapo's definition, upstream's weight by hand.
    seg_id = torch.cumsum(torch.nn.functional.pad(ends.long(), (1, 0))[:, :-1], 1)
    log_ratio = (new - old).clamp(-20, 20) * mask
    seg_sum = torch.zeros(mask.shape[0], mask.shape[1] + 1).scatter_add(1, seg_id, log_ratio)
    seg_len = torch.zeros(mask.shape[0], mask.shape[1] + 1).scatter_add(1, seg_id, mask.float())
    ratio = (seg_sum / seg_len.clamp(min=1)).gather(1, seg_id).exp()
    surrogate = -torch.min(ratio * adv, ratio.clamp(0.8, 1.28) * adv)
    surrogate = torch.where(adv < 0, torch.min(surrogate, -3.0 * adv), surrogate)
    is_log = old - rollout
    if gating == "tv":
        stat = (rollout.exp().clamp(1e-6, 1 - 1e-6) - old.exp().clamp(1e-6, 1 - 1e-6)).abs()
    else:
        stat = is_log.exp()
    if level == "seq":
        stat = ((is_log * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)).exp()
    low, high = threshold
    if mode == "clip":
        weight = stat.clamp(low, high)
    else:
        weight = torch.where((stat >= low) & (stat <= high), is_log.exp(), torch.zeros_like(stat))
    expected = (surrogate * weight * mask).sum() / mask.sum()
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(torch.autograd.grad(ours, new)[0], torch.autograd.grad(expected, new)[0])
    # ppo_kl: the token mean of the segment means is the token mean of the token log-ratios
    torch.testing.assert_close(ppo_kl, -(log_ratio.sum() / mask.sum()).detach())


def test_actor_trainer_hands_each_micro_batch_its_segments():
    """Upstream's ActorPPOTrainer.training_step, run for real on a tiny actor (plain torch in place of
    DeepSpeed): the gradient it produces is the segment-ratio loss's on this micro-batch's segments."""
    exp = make_experience(8, n=4)
    exp.advantages = torch.randn(exp.action_mask.shape, generator=torch.Generator().manual_seed(2)) * exp.action_mask
    actor = tiny_actor(1.0).train()
    with torch.no_grad():
        exp.action_log_probs = actor(exp.sequences, exp.action_mask, exp.attention_mask) + 0.2 * torch.randn(exp.action_mask.shape)
    grads = {}

    def backward(loss, model, optimizer):  # what the DeepSpeed strategy does, minus the engine
        names, params = zip(*model.named_parameters())
        grads.update(zip(names, torch.autograd.grad(loss, params)))

    strategy = SimpleNamespace(
        args=SimpleNamespace(train=SimpleNamespace(dynamic_batch_enable=False), actor=SimpleNamespace(entropy_coef=None),
                             algo=SimpleNamespace(kl=SimpleNamespace(use_loss=False), advantage=SimpleNamespace(estimator="sapo"))),
        ring_attn_group=None,
        backward=backward,
        optimizer_step=lambda *a, **k: None,
        get_grad_norm=lambda model: 0.0,
    )
    trainer = SegmentActorPPOTrainer.__new__(SegmentActorPPOTrainer)
    trainer.__dict__.update(strategy=strategy, args=strategy.args, actor=actor, aux_loss=False, ema_model=None,
                            actor_scheduler=SimpleNamespace(get_last_lr=lambda: [0.0]), actor_optim=None, is_sapo=True,
                            actor_loss_fn=SegmentPolicyLoss.like(PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)))
    info = {"dp_size": 1, "batch_num_tokens": float(exp.action_mask.sum()), "global_batch_size": 4.0}
    trainer.training_step(exp, 0.0, 0, info)
    assert not trainer.actor_loss_fn._forward_pre_hooks  # handed for this call only

    def gradient(ends):
        loss_fn = SegmentPolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
        log_probs = actor(exp.sequences, exp.action_mask, attention_mask=exp.attention_mask)
        loss = loss_fn(log_probs, exp.action_log_probs, exp.advantages, action_mask=exp.action_mask, segment_ends=ends,
                       **info)[0]
        return dict(zip([n for n, _ in actor.named_parameters()], torch.autograd.grad(loss, list(actor.parameters()))))

    expected, token_level = gradient(exp.segment_ends), gradient(fixed_segment_ends(exp.action_mask, 1))
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name])
    assert any(not torch.allclose(expected[n], token_level[n]) for n in expected)  # segments matter here
    exp.segment_ends = None
    with pytest.raises(RuntimeError, match="without segment_ends"):
        trainer.training_step(exp, 0.0, 0, info)


# ---------------------------------------------------------------- critic loss


@pytest.mark.parametrize("value_at", ["end", "start"])
def test_critic_trains_on_boundaries_with_upstream_value_loss(value_at):
    exp = make_experience(9)
    values = exp.values + 0.3 * torch.randn_like(exp.values)
    returns = torch.randn_like(exp.values)
    boundary = to_boundary_experience(copy.deepcopy(exp), value_at)
    assert boundary.action_mask.sum() == exp.segment_ends.sum()  # one read per segment
    upstream = ValueLoss(clip_eps=0.5)(values, exp.values, returns, action_mask=boundary.action_mask)
    ours = sapo_value_loss(values, exp.values, returns, exp.action_mask, exp.segment_ends, clip_eps=0.5, value_at=value_at)
    torch.testing.assert_close(upstream, ours)


def test_critic_worker_buffers_boundary_masked_experiences(fake_cuda_index):
    class Base:
        def append(self, experience):
            self.trainer.replay_buffer.append(experience)

    worker = type("Worker", (SapoCriticModelActorMixin, Base), {})()
    worker.trainer = SimpleNamespace(args=make_args("sapo"), replay_buffer=NaiveReplayBuffer(2, cpu_offload=True))
    exp = make_experience(10)
    worker.append(copy.deepcopy(exp))
    masks = torch.stack([torch.nn.functional.pad(i.action_mask, (0, 10 - i.action_mask.numel())) for i in worker.trainer.replay_buffer.items])
    assert torch.equal(masks, exp.segment_ends)
    worker.trainer.args = make_args("gae")
    worker.trainer.replay_buffer.clear()
    worker.append(copy.deepcopy(exp))
    assert sum(i.action_mask.sum() for i in worker.trainer.replay_buffer.items) == exp.action_mask.sum()


def test_critic_worker_leaves_a_shared_experience_alone(fake_cuda_index):
    """The single-process backend hands the actor and the critic the same experience object."""
    class Base:
        def append(self, experience):
            self.trainer.replay_buffer.append(experience)

    worker = type("Worker", (SapoCriticModelActorMixin, Base), {})()
    worker.trainer = SimpleNamespace(args=make_args("sapo"), replay_buffer=NaiveReplayBuffer(2, cpu_offload=True))
    shared = make_experience(12)
    mask, info = shared.action_mask.clone(), dict(shared.info)
    worker.append(shared)
    assert torch.equal(shared.action_mask, mask) and shared.info == info  # the actor's view is unchanged
    buffered = sum(item.action_mask.sum() for item in worker.trainer.replay_buffer.items)
    assert buffered == shared.segment_ends.sum() < mask.sum()


# ---------------------------------------------------------------- the whole experience step


class LocalGroup:
    """Stands in for a RayActorGroup: runs the real worker method in this process, one call
    per micro-batch as upstream's `execute_batch` does (Ray itself cannot start here)."""

    def __init__(self, worker):
        self.worker = worker

    def async_run_method_batch(self, method_name, **kwargs):
        n = len(next(iter(kwargs.values())))
        method = getattr(self.worker, method_name)
        return [[method(**{k: v[i] for k, v in kwargs.items()}) for i in range(n)]]


def worker(upstream_cls, mixin=None, **attributes):
    """An upstream Ray worker class (with SAPO's mixin) built in this process without Ray."""
    base = sapo_upstream.upstream(*upstream_cls).__ray_actor_class__
    cls = type("Worker", (mixin, base) if mixin else (base,), {})
    instance = cls.__new__(cls)
    instance.__dict__.update(strategy=SimpleNamespace(ring_attn_group=None), **attributes)
    return instance


@pytest.fixture
def tiny_critic(tmp_path):
    """Upstream's text critic (CriticModel, random value head) on a tiny Qwen2 checkpoint."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from openrlhf_sapo.models.vlm_critic import load_critic

    torch.manual_seed(1)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    critic = load_critic(str(tmp_path), "critic", attn_implementation="sdpa", init_value_head=True).float().eval()
    with torch.no_grad():
        critic.score.weight.mul_(50)  # values of order 1, so a value read at a wrong position shows
    return critic


@pytest.mark.parametrize("value_at", ["end", "start"])
def test_make_experience_batch_end_to_end(monkeypatch, tiny_critic, value_at):
    """Upstream's make_experience_batch with SAPO's default set-up: the real actor, critic and reference
    workers' forwards, KL in the reward (k1, 0.001). The actor's entropy reaches the experience, segments
    are cut from it, the KL enters the token rewards, and segment GAE reads the critic's values at
    the segment boundaries."""
    import openrlhf.trainer.ppo_utils.experience_maker as upstream_maker
    from openrlhf.models.utils import compute_approx_kl

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(upstream_maker, "ray", SimpleNamespace(put=lambda x: x, get=lambda x: x))
    actor = worker(("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor"), SapoPolicyModelActorMixin, actor=tiny_actor(0.8))
    critic = worker(("openrlhf.trainer.ray.ppo_critic", "CriticModelActor"), SapoCriticModelActorMixin, critic=tiny_critic)
    torch.manual_seed(5)
    reference = worker(("openrlhf.trainer.ray.launcher", "ReferenceModelActor"), model=tiny_actor(0.8))
    for p in reference.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))  # a reference that differs from the actor: a non-zero KL

    args = make_args("sapo", value_at=value_at)
    args.algo.advantage.lambd = 0.99
    args.algo.kl = SimpleNamespace(use_loss=False, estimator="k1", init_coef=0.001)
    args.ds = SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1)
    args.train = SimpleNamespace(dynamic_batch_enable=False, colocate_all=False, colocate_actor_ref=False, colocate_critic_reward=False)
    args.rollout.micro_batch_size = 2
    maker = SegmentExperienceMaker(LocalGroup(actor), LocalGroup(critic), None, LocalGroup(reference), SimpleNamespace(value=0.001),
                                   SimpleNamespace(args=args), tokenizer=SimpleNamespace(pad_token_id=0))

    # Rollout samples as upstream's generator makes them: one response each, tensors of batch 1.
    batch = make_experience(11, n=4, with_segments=False)
    samples = [
        SegmentExperience(
            **{k: getattr(batch, k)[i : i + 1] for k in ("sequences", "attention_mask", "action_mask", "rewards", "response_length", "total_length")},
            info={"reward": batch.rewards[i : i + 1]},
        )
        for i in range(4)
    ]
    experiences = maker.make_experience_batch(samples)

    assert len(experiences) == 2 and all(isinstance(e, SegmentExperience) for e in experiences)
    raw = []
    for exp in experiences:
        mask = exp.action_mask.bool()
        log_probs, entropy = actor.forward(exp.sequences, exp.action_mask, exp.attention_mask, return_entropy=True)
        values = critic.forward(exp.sequences, exp.action_mask, exp.attention_mask)
        base = reference.forward(exp.sequences, exp.action_mask, exp.attention_mask)
        torch.testing.assert_close(exp.entropy, entropy)
        torch.testing.assert_close(exp.action_log_probs, log_probs)
        torch.testing.assert_close(exp.values, values)
        assert values[mask].std() > 0.1  # the critic's values differ along the response
        assert torch.equal(exp.segment_ends, entropy_segment_ends(entropy, mask, 30.0))
        assert (exp.segment_ends.sum(1) < mask.sum(1)).any()  # multi-token segments
        assert exp.info["sapo/segments_per_response"].shape == (mask.shape[0],)
        torch.testing.assert_close(exp.info["policy_entropy"], (entropy * mask).sum(1) / mask.sum(1))
        kl = compute_approx_kl(log_probs, base, kl_estimator="k1")
        assert kl[mask].abs().max() > 1e-3
        reward = compute_reward(exp.rewards.float(), 0.001, kl, action_mask=exp.action_mask, reward_clip_range=(-10, 10))
        advantages, returns = segment_gae(reward, values, mask, exp.segment_ends, 1.0, 0.99, value_at)
        torch.testing.assert_close(exp.returns, returns)
        raw.append(advantages)
    # Advantages: whitened over both micro-batches, then clamped.
    flat_mask = torch.cat([e.action_mask.flatten() for e in experiences])[None].bool()
    expected = masked_whiten(torch.cat([r.flatten() for r in raw])[None], flat_mask, clamp=5.0)[0]
    torch.testing.assert_close(torch.cat([e.advantages.flatten() for e in experiences]), expected)


def test_baseline_experience_forward_computes_no_entropy(monkeypatch, tiny_critic):
    """PPO's experience forward costs what upstream's does: no entropy pass unless --logger.policy_entropy."""
    import openrlhf.trainer.ppo_utils.experience_maker as upstream_maker

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    monkeypatch.setattr(upstream_maker, "ray", SimpleNamespace(put=lambda x: x, get=lambda x: x))
    calls = []
    monkeypatch.setattr(models_utils, "chunked_entropy", lambda logits: calls.append(logits.shape) or chunked_entropy(logits))
    actor = worker(("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor"), SapoPolicyModelActorMixin, actor=tiny_actor(1.0))
    critic = worker(("openrlhf.trainer.ray.ppo_critic", "CriticModelActor"), SapoCriticModelActorMixin, critic=tiny_critic)
    batch = make_experience(14, n=2, with_segments=False)
    samples = [SegmentExperience(**{k: getattr(batch, k) for k in ("sequences", "attention_mask", "action_mask", "rewards")},
                                 info={"reward": batch.rewards})]
    for estimator, logged in (("gae", False), ("gae", True), ("sapo", False)):
        args = make_args(estimator)
        args.algo.kl = SimpleNamespace(use_loss=False, estimator="k1", init_coef=0.0)
        args.logger = SimpleNamespace(policy_entropy=logged)
        args.ds = SimpleNamespace(ring_attn_size=1, tensor_parallel_size=1)
        args.train = SimpleNamespace(dynamic_batch_enable=False, colocate_all=False, colocate_actor_ref=False,
                                     colocate_critic_reward=False)
        maker = SegmentExperienceMaker(LocalGroup(actor), LocalGroup(critic), None, None, SimpleNamespace(value=0.0),
                                       SimpleNamespace(args=args), tokenizer=SimpleNamespace(pad_token_id=0))
        calls.clear()
        exp = maker.make_experience(copy.deepcopy(samples))[0]
        computed = estimator == "sapo" or logged
        assert bool(calls) == computed and ("policy_entropy" in exp.info) == computed, (estimator, logged)
        assert (exp.entropy is not None) == (estimator == "sapo")


def test_a_pickled_sapo_worker_class_patches_a_fresh_process(tmp_path):
    """What Ray does: pickle the remote class in the driver, load it in a new process (where
    nothing of ours ran), construct it. Its __init__ must make upstream build SAPO's classes there."""
    import subprocess
    import sys

    import ray.cloudpickle as cloudpickle

    from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActor

    (tmp_path / "cls.pkl").write_bytes(cloudpickle.dumps(SapoCriticModelActor.__ray_actor_class__))
    script = f"""
import ray.cloudpickle as cloudpickle
cls = cloudpickle.loads(open({str(tmp_path / "cls.pkl")!r}, "rb").read())
import openrlhf.trainer.ppo_utils.experience as experience
import openrlhf.trainer.ray.ppo_critic as ppo_critic
before = experience.Experience.__name__
cls.__new__(cls).__init__(1, 0, "127.0.0.1", 29555)  # upstream's own __init__ (no process group yet)
print(before, experience.Experience.__name__, ppo_critic.CriticPPOTrainer.__name__)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-3:] == ["Experience", "SegmentExperience", "SegmentCriticPPOTrainer"]


def test_strategy_prints_a_model_as_one_line(capsys):
    """Upstream's workers print their whole model (hundreds of lines); through get_strategy, after the
    patches, it is one line; other messages are printed as upstream prints them."""
    from openrlhf.utils import get_strategy

    from openrlhf_sapo.utils.deepspeed import SapoDeepspeedStrategy

    from openrlhf_sapo.cli.train_ppo_ray import parse_args

    args = parse_args(["--actor.model_name_or_path", "a", "--reward.remote_url", "r.py", "--vllm.num_engines", "1",
                       "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2"])
    strategy = get_strategy(args)
    assert isinstance(strategy, SapoDeepspeedStrategy)
    model = tiny_actor().model
    strategy.print(model)
    strategy.print("mean: 0, std 1")
    count = sum(p.numel() for p in model.parameters())
    assert capsys.readouterr().out.splitlines() == [f"Qwen2ForCausalLM: {count} parameters", "mean: 0, std 1"]
