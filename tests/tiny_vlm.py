"""A tiny random Qwen2.5-VL built locally (no download), for the VLM critic tests."""

import torch

IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 120, 121, 122, 123


def build_tiny_qwen2_5_vl(path, seed=0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # sums to head_dim / 2
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56,
        ),
        image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


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
    prompt = torch.tensor([3, 4, VISION_START, IMAGE_TOKEN, VISION_END, 5])
    sequences = torch.cat([prompt.expand(batch, -1), torch.randint(6, 100, (batch, response), generator=g)], dim=1)
    return sequences, torch.ones_like(sequences), torch.ones(batch, response, dtype=torch.bool)
