"""The tiny offline Qwen2 / Qwen2.5-VL checkpoints the CPU demo trains (openrlhf_sapo.demo.tiny_models)."""

import time

import pytest
import torch

from openrlhf_sapo.demo.tiny_models import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_char_tokenizer,
    build_tiny_qwen2,
    build_tiny_qwen2_5_vl,
    vision_token_ids,
)
from openrlhf_sapo.utils import cpu_compat

cpu_compat.apply()  # before anything imports openrlhf

IMAGE_CHAT = [
    {"role": "system", "content": "Answer."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digits?"}]},
]


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
    return str(build_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_qwen2"))))


@pytest.fixture(scope="module")
def vl_path(tmp_path_factory):
    return str(build_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))))


@pytest.fixture(scope="module")
def processor(vl_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vl_path, trust_remote_code=True)


def image(width=56, height=28, seed=0):
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_ids_are_fixed_and_round_trip():
    from transformers import PreTrainedTokenizerFast

    tok = build_char_tokenizer(None)
    assert isinstance(tok, PreTrainedTokenizerFast)
    text = "Hi there!\n  x = 3/4 {ok} ~é"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [ord("H"), ord("i"), ord(" ")] and ord("\n") in ids  # id = byte value for ASCII
    assert all(tok.convert_tokens_to_ids(t) == 256 + i for i, t in enumerate(SPECIAL_TOKENS))
    assert len(tok) == 256 + len(SPECIAL_TOKENS)
    assert tok.decode(ids) == text  # non-ASCII as UTF-8 bytes, nothing lost
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    assert build_char_tokenizer(None).get_vocab() == tok.get_vocab()
    # Special tokens are single tokens inside text.
    assert tok("a<|im_start|>b", add_special_tokens=False)["input_ids"] == [97, 257, 98]


def test_chat_template_renders_images_and_the_generation_prompt():
    tok = build_char_tokenizer(None)
    prompt = tok.apply_chat_template(IMAGE_CHAT, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nAnswer.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which digits?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_prompt = tok.apply_chat_template(IMAGE_CHAT, tokenize=False)
    assert no_prompt == prompt[: -len("<|im_start|>assistant\n")]
    with pytest.raises(Exception, match="no video processor"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}]}], tokenize=False)


def test_tokenizer_saves_and_reloads_with_the_same_ids(tmp_path):
    from transformers import AutoTokenizer

    build_char_tokenizer(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "<|im_start|>user\n12 + 30 = ?<|im_end|>\n"
    assert reloaded(text)["input_ids"] == build_char_tokenizer(None)(text)["input_ids"]
    assert reloaded.chat_template == CHAT_TEMPLATE
    with pytest.raises(ValueError, match="single characters"):
        build_char_tokenizer(None, extra_chars=["ab"])


def test_vision_token_ids_and_a_clear_error_without_them():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = build_char_tokenizer(None)
    assert vision_token_ids(tok) == sorted(tok.convert_tokens_to_ids(
        ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]))
    word_level = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")
    with pytest.raises(ValueError, match="vision_start"):
        vision_token_ids(plain)


# --- Qwen2 -----------------------------------------------------------------------------------


def test_qwen2_loads_with_auto_classes_and_is_seeded(qwen2_path, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(qwen2_path)
    tok = AutoTokenizer.from_pretrained(qwen2_path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.eos_token_id == tok.eos_token_id and model.config.pad_token_id == tok.pad_token_id
    same = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(str(tmp_path / "same")))
    other = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(str(tmp_path / "other"), seed=1))
    a, b, c = model.state_dict(), same.state_dict(), other.state_dict()
    state = torch.random.get_rng_state()
    build_tiny_qwen2(str(tmp_path / "rng"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)

    ids = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=True)
    assert out.shape[1] > ids["input_ids"].shape[1] and out[0, -1] < len(tok)


def test_qwen2_build_is_fast(tmp_path):
    build_tiny_qwen2(str(tmp_path / "warm"))  # imports warmed
    start = time.perf_counter()
    build_tiny_qwen2(str(tmp_path / "timed"))
    assert time.perf_counter() - start < 2.0


def test_openrlhf_actor_loads_qwen2_and_matches_the_hf_log_probs(qwen2_path):
    from openrlhf.models import Actor
    from transformers import AutoModelForCausalLM

    actor = Actor(qwen2_path, attn_implementation="sdpa", param_dtype="bf16")
    assert not getattr(actor, "is_vlm", False)
    sequences = torch.tensor([[60, 61, 62, 63, 64, 65, 66, 67]])
    action_mask = torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        log_probs = actor(sequences, action_mask, torch.ones_like(sequences))
        hf = AutoModelForCausalLM.from_pretrained(qwen2_path, dtype=torch.bfloat16)
        logits = hf(sequences).logits.float()
    expected = logits.log_softmax(-1)[:, :-1].gather(-1, sequences[:, 1:, None]).squeeze(-1)[:, -3:]
    assert log_probs.shape == (1, 3)
    torch.testing.assert_close(log_probs, expected, atol=2e-2, rtol=0)


def test_bad_sizes_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="multiple of heads"):
        build_tiny_qwen2(str(tmp_path / "a"), hidden=30, heads=4)
    with pytest.raises(ValueError, match="vision_hidden"):
        build_tiny_qwen2_5_vl(str(tmp_path / "b"), vision_hidden=40)


# --- Qwen2.5-VL ------------------------------------------------------------------------------


def test_vl_config_ids_match_the_tokenizer(vl_path, processor):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(vl_path)
    tok = processor.tokenizer
    assert config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    text = config.get_text_config()
    assert text.vocab_size == len(tok) and config.vision_config.out_hidden_size == text.hidden_size
    head_dim = text.hidden_size // text.num_attention_heads
    rope = getattr(text, "rope_parameters", None) or text.rope_scaling
    assert sum(rope["mrope_section"]) == head_dim // 2


def test_processor_puts_one_image_token_per_28px_square(processor):
    assert type(processor).__name__ == "Qwen2_5_VLProcessorNoVideo"
    prompt = processor.apply_chat_template(IMAGE_CHAT, tokenize=False, add_generation_prompt=True)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for (w, h), tokens in {(56, 28): 2, (28, 28): 1, (84, 56): 6, (8, 8): 1}.items():
        out = processor(text=[prompt], images=[image(w, h)], return_tensors="pt")
        assert int((out["input_ids"] == pad).sum()) == tokens, (w, h)
        assert out["image_grid_thw"].prod().item() == 4 * tokens
        assert out["pixel_values"].shape == (4 * tokens, 3 * 2 * 14 * 14)
    with pytest.raises(ValueError, match="no video processor"):
        processor(text=[prompt], videos=[[image()]])


def test_vl_forward_and_generate_without_vision_tokens(vl_path, processor):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(vl_path).eval()
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    prompt = processor.apply_chat_template(IMAGE_CHAT, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt, prompt], images=[image(56, 28, seed=1), image(56, 28, seed=2)],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (*inputs["input_ids"].shape, len(processor.tokenizer)) and torch.isfinite(logits).all()
    # The image reaches the logits.
    other = processor(text=[prompt, prompt], images=[image(56, 28, seed=3), image(56, 28, seed=4)],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (model(**other).logits[:, -1] - logits[:, -1]).abs().max() > 1e-4

    banned = vision_token_ids(processor)
    n = inputs["input_ids"].shape[1]
    # Push the vision tokens to the top: unsuppressed, the model samples them and the re-forward of
    # prompt + response (what the actor does after a rollout) fails; suppressed, neither happens.
    favour = {(i,): 50.0 for i in banned}
    mm = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    torch.manual_seed(0)
    bad = model.generate(**inputs, max_new_tokens=8, do_sample=True, sequence_bias=favour)
    assert torch.isin(bad[:, n:], torch.tensor(banned)).all()
    with pytest.raises(ValueError, match="[Ii]mage features and image tokens"), torch.no_grad():
        model(input_ids=bad, attention_mask=torch.ones_like(bad), **mm)
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=8, do_sample=True, sequence_bias=favour, suppress_tokens=banned)
    assert out.shape[1] > n and not torch.isin(out[:, n:], torch.tensor(banned)).any()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=out, attention_mask=torch.ones_like(out), **mm).logits).all()


def test_vl_build_is_fast_and_seeded(tmp_path, vl_path):
    from safetensors.torch import load_file

    build_tiny_qwen2_5_vl(str(tmp_path / "warm"))
    start = time.perf_counter()
    build_tiny_qwen2_5_vl(str(tmp_path / "timed"))
    assert time.perf_counter() - start < 2.0
    a, b = load_file(f"{vl_path}/model.safetensors"), load_file(str(tmp_path / "timed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_openrlhf_get_tokenizer_accepts_the_vl_folder(vl_path):
    from openrlhf.utils.utils import get_tokenizer, is_vlm_model
    from openrlhf.utils.vlm_utils import process_prompt_with_images

    assert is_vlm_model(vl_path)
    proc = get_tokenizer(vl_path, None, padding_side="left")
    assert hasattr(proc, "image_processor") and proc.tokenizer.padding_side == "left"
    assert (proc.pad_token, proc.eos_token) == ("<|endoftext|>", "<|im_end|>")
    prompt = proc.apply_chat_template(IMAGE_CHAT, tokenize=False, add_generation_prompt=True)
    ids, mm, pil = process_prompt_with_images(proc, prompt, [image(56, 28)])
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 2
    assert set(mm) == {"pixel_values", "image_grid_thw"} and len(pil) == 1


def test_openrlhf_actor_and_our_critic_load_the_vl_folder(vl_path, processor):
    from openrlhf.models import Actor

    from openrlhf_sapo.models.vlm_critic import load_critic

    prompt = processor.apply_chat_template(IMAGE_CHAT, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[image(56, 28)], return_tensors="pt")
    mm = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    response = torch.tensor([[ord(c) for c in "3 and 4"]])
    sequences = torch.cat([inputs["input_ids"], response], dim=1)
    action_mask = torch.ones_like(response, dtype=torch.bool)

    actor = Actor(vl_path, attn_implementation="sdpa", param_dtype="bf16")
    assert actor.is_vlm
    critic = load_critic(vl_path, "critic", param_dtype="bf16", init_value_head=True)
    assert type(critic).__name__ == "Qwen2_5_VLForConditionalGenerationCritic"
    with torch.no_grad():
        log_probs = actor(sequences, action_mask, torch.ones_like(sequences), **dict(mm))
        values = critic(sequences, action_mask, torch.ones_like(sequences), **dict(mm))
    assert log_probs.shape == values.shape == response.shape
    assert torch.isfinite(log_probs).all() and (log_probs < 0).all() and torch.isfinite(values).all()
