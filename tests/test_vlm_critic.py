"""The VLM critic on a tiny random Qwen2.5-VL built in the test (CPU, no download)."""

import copy
from types import SimpleNamespace

import pytest
import torch

from openrlhf_sapo import patches, upstream
from openrlhf_sapo.models.vlm_critic import get_vlm_critic, load_critic
from tests.tiny_vlm import IMAGE_TOKEN, build_tiny_qwen2_5_vl, image_inputs, vlm_sequences

patches.apply_patches()

from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience  # noqa: E402
from openrlhf_sapo.trainer.ppo_utils.experience_maker import mask_vision_tokens_in_responses  # noqa: E402
from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActorMixin, SegmentCriticPPOTrainer  # noqa: E402


@pytest.fixture(scope="module")
def vlm_path(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


def two_images(batch):
    """Per-sample inputs as the experience stores them (one dict per sample)."""
    return [image_inputs(seed=i) for i in range(batch)]


def merged(inputs):
    return {k: torch.cat([d[k] for d in inputs]) for k in inputs[0]}


def test_loads_the_vlm_weights_and_initialises_the_head_like_upstream(vlm_path):
    from transformers import AutoModelForImageTextToText

    critic = load_critic(str(vlm_path), "critic", param_dtype="bf16", init_value_head=True)
    vlm = AutoModelForImageTextToText.from_pretrained(str(vlm_path), dtype=torch.bfloat16)
    ours, theirs = critic.state_dict(), vlm.state_dict()
    assert set(ours) - set(theirs) == {"score.weight"} and set(theirs) - set(ours) == {"lm_head.weight"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if k in theirs)  # no silently random backbone
    std = critic.score.weight.float().std().item()
    assert 0.3 / 65 < std < 3 / 65  # hidden 64; upstream's init: normal with std 1 / (hidden + 1)


def test_text_models_still_get_upstreams_critic(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    critic = load_critic(str(tmp_path), "critic", attn_implementation="sdpa", init_value_head=True)
    assert type(critic).__name__ == "CriticModel"
    with pytest.raises(ValueError, match="not a vision-language model"):
        get_vlm_critic(str(tmp_path))


def test_values_depend_on_the_image(vlm_path):
    critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True).float().eval()
    sequences, attention, action = vlm_sequences()
    with torch.no_grad():
        a = critic(sequences, action, attention, **merged(two_images(2)))
        b = critic(sequences, action, attention, **merged([image_inputs(seed=7), image_inputs(seed=8)]))
    assert a.shape == action.shape and torch.isfinite(a).all()
    assert (a - b).abs().max() > 1e-4


def test_head_trains_and_a_frozen_vision_tower_stays_put(vlm_path):
    critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True, freeze_visual_encoder=True).float()
    vision_before = copy.deepcopy(critic.model.visual.state_dict())
    sequences, attention, action = vlm_sequences()
    inputs, target = merged(two_images(2)), torch.full(action.shape, 0.7)
    optim = torch.optim.Adam([p for p in critic.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = ((critic(sequences, action, attention, **inputs) - target) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(torch.equal(v, critic.model.visual.state_dict()[k]) for k, v in vision_before.items())


def test_save_and_load_round_trip(vlm_path, tmp_path):
    critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True)
    critic.save_pretrained(tmp_path)  # what upstream's save path calls on the unwrapped model
    again = load_critic(str(tmp_path), "critic", param_dtype="bf16")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in critic.state_dict().items())
    sequences, attention, action = vlm_sequences()
    with torch.no_grad():
        inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in merged(two_images(2)).items()}
        inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
        # equal weights; bf16 tolerance: .bfloat16() also cast the rotary buffers, which loading keeps in fp32
        torch.testing.assert_close(critic(sequences, action, attention, **inputs), again(sequences, action, attention, **inputs),
                                   rtol=2e-2, atol=2e-2)


def test_critic_worker_forward_gets_the_images(vlm_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    base = upstream.upstream("openrlhf.trainer.ray.ppo_critic", "CriticModelActor").__ray_actor_class__
    cls = type("Critic", (SapoCriticModelActorMixin, base), {})
    worker = cls.__new__(cls)
    worker.critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True).float()
    worker.strategy = SimpleNamespace(ring_attn_group=None)
    sequences, attention, action = vlm_sequences()
    images = two_images(2)
    values = worker.forward(sequences, action, attention, mm_train_inputs_list=[images])
    with torch.no_grad():
        direct = worker.critic(sequences, action, attention, **merged(images))
    torch.testing.assert_close(values, direct)
    assert worker.critic.__class__.__name__.endswith("Critic")  # the injector is gone again


def test_critic_training_step_gets_the_images(vlm_path):
    """Upstream's CriticPPOTrainer.training_step, with plain torch in place of DeepSpeed's engine."""
    critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True).float()
    optim = torch.optim.SGD(critic.parameters(), lr=0.1)
    seen = []
    forward = critic.forward
    critic.forward = lambda *a, **k: seen.append(sorted(k)) or forward(*a, **k)
    strategy = SimpleNamespace(
        args=SimpleNamespace(train=SimpleNamespace(dynamic_batch_enable=False), actor=SimpleNamespace(aux_loss_coef=0)),
        ring_attn_group=None,
        backward=lambda loss, model, opt: loss.backward(),
        optimizer_step=lambda opt, model, scheduler, name: (opt.step(), opt.zero_grad()),
        get_grad_norm=lambda model: 0.0,
    )
    trainer = SegmentCriticPPOTrainer.__new__(SegmentCriticPPOTrainer)
    ValueLoss = upstream.upstream("openrlhf.models.loss", "ValueLoss")
    trainer.__dict__.update(strategy=strategy, args=strategy.args, critic=critic, critic_optim=optim, aux_loss=False,
                            critic_scheduler=SimpleNamespace(get_last_lr=lambda: [0.1]), critic_loss_fn=ValueLoss(0.5))
    sequences, attention, action = vlm_sequences()
    exp = SegmentExperience(sequences=sequences, attention_mask=attention, action_mask=action,
                            values=torch.zeros(action.shape), returns=torch.ones(action.shape), mm_train_inputs=two_images(2))
    before = trainer.training_step(exp, 0, {"dp_size": 1, "batch_num_tokens": float(action.sum()), "global_batch_size": 2.0})
    assert "pixel_values" in seen[-1] and "image_grid_thw" in seen[-1]
    after = trainer.training_step(exp, 1, {"dp_size": 1, "batch_num_tokens": float(action.sum()), "global_batch_size": 2.0})
    assert after["critic_loss"] < before["critic_loss"]


def test_vision_tokens_sampled_in_a_response_are_masked_not_fed(vlm_path):
    critic = get_vlm_critic(str(vlm_path), param_dtype="bf16", init_value_head=True).float().eval()
    sequences, attention, action = vlm_sequences()
    sequences[0, -2] = IMAGE_TOKEN  # a random policy samples <|image_pad|>
    with pytest.raises(Exception, match="[Ii]mage"):
        critic(sequences, action, attention, **merged(two_images(2)))
    sample = SegmentExperience(sequences=sequences.clone(), attention_mask=attention, action_mask=action.clone())
    assert mask_vision_tokens_in_responses(sample, {IMAGE_TOKEN}, pad_id=0) == 1
    assert sample.sequences[0, -2] == 0 and not sample.action_mask[0, -2] and sample.action_mask.sum() == action.sum() - 1
    assert (sample.sequences[:, :6] == sequences[:, :6]).all()  # the prompt's image token is untouched
    with torch.no_grad():
        assert torch.isfinite(critic(sample.sequences, sample.action_mask, attention, **merged(two_images(2)))).all()


def test_text_critic_next_to_a_vlm_actor_gets_tokens_only(tmp_path, monkeypatch):
    """A cheaper text critic with a VLM actor: the experience forward and the training step drop the
    images (a text critic's forward takes none), both through upstream's own worker and trainer code."""
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2

    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    torch.manual_seed(0)
    critic = load_critic(build_tiny_qwen2(str(tmp_path / "text")), "critic", attn_implementation="sdpa",
                         init_value_head=True).float()
    base = upstream.upstream("openrlhf.trainer.ray.ppo_critic", "CriticModelActor").__ray_actor_class__
    cls = type("Critic", (SapoCriticModelActorMixin, base), {})
    worker = cls.__new__(cls)
    worker.critic, worker.strategy = critic, SimpleNamespace(ring_attn_group=None)
    sequences, attention, action = vlm_sequences()
    values = worker.forward(sequences, action, attention, mm_train_inputs_list=[two_images(2)])
    with torch.no_grad():
        torch.testing.assert_close(values, critic(sequences, action, attention))

    optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
    strategy = SimpleNamespace(
        args=SimpleNamespace(train=SimpleNamespace(dynamic_batch_enable=False), actor=SimpleNamespace(aux_loss_coef=0)),
        ring_attn_group=None, backward=lambda loss, model, opt: loss.backward(),
        optimizer_step=lambda opt, model, scheduler, name: (opt.step(), opt.zero_grad()), get_grad_norm=lambda model: 0.0)
    trainer = SegmentCriticPPOTrainer.__new__(SegmentCriticPPOTrainer)
    trainer.__dict__.update(strategy=strategy, args=strategy.args, critic=critic, critic_optim=optim, aux_loss=False,
                            critic_scheduler=SimpleNamespace(get_last_lr=lambda: [0.1]),
                            critic_loss_fn=upstream.upstream("openrlhf.models.loss", "ValueLoss")(0.5))
    exp = SegmentExperience(sequences=sequences, attention_mask=attention, action_mask=action,
                            values=torch.zeros(action.shape), returns=torch.ones(action.shape), mm_train_inputs=two_images(2))
    info = {"dp_size": 1, "batch_num_tokens": float(action.sum()), "global_batch_size": 2.0}
    losses = [trainer.training_step(exp, step, info)["critic_loss"] for step in range(5)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("tied", [False, True])
def test_critic_of_a_vlm_with_or_without_tied_embeddings(tmp_path, tied):
    """Qwen2.5-VL-3B ties its LM head to the input embeddings (7B does not): the critic drops the head
    either way, keeps the embeddings, trains, and reloads exactly."""
    from transformers import AutoModelForImageTextToText

    path = build_tiny_qwen2_5_vl(str(tmp_path / "vlm"), tie_word_embeddings=tied)
    vlm = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.bfloat16).float()
    assert (vlm.lm_head.weight.data_ptr() == vlm.model.language_model.embed_tokens.weight.data_ptr()) == tied
    torch.manual_seed(0)
    critic = get_vlm_critic(path, param_dtype="bf16", init_value_head=True).float()
    assert not hasattr(critic, "lm_head")
    embeddings = critic.model.language_model.embed_tokens.weight
    assert torch.equal(embeddings, vlm.model.language_model.embed_tokens.weight)  # not re-initialised
    sequences, attention, action = vlm_sequences()
    inputs, target = merged(two_images(2)), torch.full(action.shape, 0.5)
    optim = torch.optim.Adam(critic.parameters(), lr=1e-3)
    losses = []
    for _ in range(5):
        loss = ((critic(sequences, action, attention, **inputs) - target) ** 2).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and all(map(torch.isfinite, map(torch.tensor, losses)))
    assert not torch.equal(embeddings, vlm.model.language_model.embed_tokens.weight)  # trained, as a plain parameter
    critic = critic.bfloat16()
    critic.save_pretrained(tmp_path / "critic")
    again = load_critic(str(tmp_path / "critic"), "critic", param_dtype="bf16")
    assert set(again.state_dict()) == set(critic.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in critic.state_dict().items())
    with torch.no_grad():
        inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
        # equal weights; bf16 tolerance: .bfloat16() also cast the rotary buffers, which loading keeps in fp32
        torch.testing.assert_close(critic(sequences, action, attention, **inputs), again(sequences, action, attention, **inputs),
                                   rtol=2e-2, atol=2e-2)
