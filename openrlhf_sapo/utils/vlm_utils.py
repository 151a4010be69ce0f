"""What makes a model a vision-language model here (the counterpart of openrlhf/utils/vlm_utils.py).

Standard library only (the CLI's checks use it without loading transformers or torch).
- A VLM is a model whose config has a `vision_config`: upstream's criterion (openrlhf.utils.utils
  `is_vlm_model`, which loads the config with transformers); `is_vlm_config` reads a loaded config
  (object or dict), `is_vlm_checkpoint` a local folder's config.json.
- Its vision special tokens (Qwen-VL's markers and pads, and the processor's image / video ids) may
  only appear where the processor put them: a sampled one breaks every later forward of that sequence.
"""

from __future__ import annotations

import json
import os
from typing import Optional

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def is_vlm_config(config) -> bool:
    """Whether a model config (a transformers config or its dict) is a vision-language model's."""
    if isinstance(config, dict):
        return config.get("vision_config") is not None
    return getattr(config, "vision_config", None) is not None


def is_vlm_checkpoint(path: Optional[str]) -> bool:
    """Whether a local model folder's config.json is a vision-language model's (hub names: not read)."""
    config = os.path.join(os.path.expanduser(path or ""), "config.json")
    if not path or not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return is_vlm_config(json.load(f))
    except (OSError, ValueError):
        return False


def vision_special_token_ids(processor, strict: bool = False) -> list:
    """Sorted ids of a VLM processor's (or tokenizer's) vision special tokens. `strict`: every one of
    VISION_SPECIAL_TOKENS must be in the vocabulary (ValueError naming the missing one)."""
    tokenizer = getattr(processor, "tokenizer", processor)
    ids = {getattr(processor, attr, None) for attr in ("image_token_id", "video_token_id")}
    vocab = tokenizer.get_vocab()
    for token in VISION_SPECIAL_TOKENS:
        if token not in vocab and strict:
            raise ValueError(f"{token} is not in this tokenizer's vocabulary")
        ids.add(vocab.get(token))
    return sorted(int(i) for i in ids if i is not None)
