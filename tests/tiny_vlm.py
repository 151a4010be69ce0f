"""Inputs for the VLM critic tests, on the demo's tiny random Qwen2.5-VL (built offline)."""

import torch

from openrlhf_sapo.demo.tiny_models import build_char_tokenizer, build_tiny_qwen2_5_vl  # noqa: F401

_tok = build_char_tokenizer()
VISION_START, VISION_END, IMAGE_TOKEN, VIDEO_TOKEN = (
    _tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
)


def image_inputs(seed, images=1):
    """Pixel values of `images` 28x28 images: 4 patches of 14 px each, one image token after the 2x2 merge."""
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(4 * images, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, 2, 2]] * images),
    }


def vlm_sequences(batch=2, response=5, seed=0):
    """[prompt with one image] + response tokens, with the action mask over the response."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([65, 66, VISION_START, IMAGE_TOKEN, VISION_END, 67])
    sequences = torch.cat([prompt.expand(batch, -1), torch.randint(32, 127, (batch, response), generator=g)], dim=1)
    return sequences, torch.ones_like(sequences), torch.ones(batch, response, dtype=torch.bool)
