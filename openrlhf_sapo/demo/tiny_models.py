"""Tiny random Qwen2 / Qwen2.5-VL checkpoints built offline, for the CPU demo and tests.

Everything here is built locally from a seed (no download, no network): a character-level
tokenizer with Qwen's special tokens and a ChatML chat template, a random `Qwen2ForCausalLM`,
and a random `Qwen2_5_VLForConditionalGeneration` with an image processor and a processor.

- Tokenizer: transformers' `Qwen2Tokenizer` over a byte-level vocabulary with no merges, so
  every ASCII character is one token (id = its byte value) and other characters are their
  UTF-8 bytes; Qwen's special tokens follow at fixed ids. Being the class `AutoTokenizer`
  picks for Qwen folders, it reloads with the same ids.
- VLM processor: in transformers 5 the stock `Qwen2_5_VLProcessor` requires a video
  processor, and every video processor needs torchvision (absent on the CPU install). The
  folder therefore carries a small processor subclass without a video processor as remote
  code, registered for `AutoProcessor`; `AutoProcessor.from_pretrained(path,
  trust_remote_code=True)` (what OpenRLHF calls for VLMs) loads it offline.
- Image processor: `Qwen2VLImageProcessorPil` with `min_pixels=28*28` (the default would
  upscale small images), patch 14, merge 2: one image token per 28x28 area.
- A random policy samples vision tokens; `vision_token_ids(...)` lists them so sampling can
  suppress them (`generate(..., suppress_tokens=...)` or `bad_words_ids`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from typing import Iterable, Optional

from openrlhf_sapo.utils.vlm_utils import VISION_SPECIAL_TOKENS, vision_special_token_ids

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
# Order fixes the ids (they follow the character vocabulary).
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
assert set(VISION_TOKENS) == set(VISION_SPECIAL_TOKENS)  # the tokens utils/vlm_utils.py guards

# One image token per 28x28 area: patch 14, 2x2 merge.
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
IMAGE_TOKEN_PIXELS = (PATCH_SIZE * MERGE_SIZE) ** 2

# ChatML. Content is a string or a list of items; image items render as the vision markers the
# processor expands. Videos are refused: the bundled processor has no video processor.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{{- raise_exception('this tiny model has no video processor: video items are not supported') -}}"
    "{%- elif 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- endif -%}"
)

_PROCESSOR_MODULE = "processing_qwen2_5_vl_no_video"
_PROCESSOR_CLASS = "Qwen2_5_VLProcessorNoVideo"
_PROCESSOR_SOURCE = '''"""Qwen2.5-VL processor without a video processor (written by openrlhf_sapo.demo.tiny_models).

transformers' Qwen2_5_VLProcessor requires a video processor, and video processors need
torchvision; this subclass handles text and images only.
"""

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor


class Qwen2_5_VLProcessorNoVideo(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("this processor has no video processor (it is built without torchvision): pass no videos")
        return super().__call__(images=images, text=text, **kwargs)
'''


def _byte_alphabet() -> list:
    """The 256 byte-level characters (GPT-2 / Qwen byte-to-unicode map), indexed by byte value."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    return [table[b] for b in range(256)]


def build_char_tokenizer(path: Optional[str] = None, extra_chars: Iterable[str] = ()):
    """A character-level Qwen2 tokenizer with Qwen's special tokens and a ChatML chat template.

    Built as transformers' own `Qwen2Tokenizer` (a `PreTrainedTokenizerFast`) over a byte-level
    vocabulary with no merges: one token per byte, so every ASCII character (printable ASCII,
    newline, ...) is one token and any other character is its UTF-8 bytes; nothing is unknown.
    It is the class `AutoTokenizer` returns for a qwen2 / qwen2_5_vl folder (which rebuilds the
    pre-tokenizer from vocab and merges), so the saved folder reloads with identical ids.

    Ids (deterministic): token id = byte value (0-255; e.g. "a" is 97), then the Qwen special
    tokens in `SPECIAL_TOKENS` order from 256. pad = `<|endoftext|>`, eos = `<|im_end|>`, no bos,
    no unk. `extra_chars` is validated and otherwise needs nothing: every character is already
    covered. Saved to `path` when given.
    """
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    for ch in extra_chars:
        if not isinstance(ch, str) or len(ch) != 1:
            raise ValueError(f"extra_chars must be single characters, got {ch!r}")
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (ENDOFTEXT, IM_END)],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    for token in SPECIAL_TOKENS:
        if tokenizer.convert_tokens_to_ids(token) != vocab[token]:
            raise RuntimeError(f"{token} got id {tokenizer.convert_tokens_to_ids(token)}, expected {vocab[token]}")
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, expected {len(vocab)}")
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def vision_token_ids(tokenizer_or_processor) -> list:
    """Ids of the vision special tokens (markers and pads), sorted.

    Suppress these when sampling from a random VLM (its forward fails when a response contains
    image tokens): `model.generate(..., suppress_tokens=ids)` or `bad_words_ids=[[i] for i in ids]`.
    Raises ValueError when the tokenizer lacks one of them."""
    return vision_special_token_ids(tokenizer_or_processor, strict=True)


def _init_seeded(build, seed: int):
    """`build()` under `torch.manual_seed(seed)`, leaving the caller's global RNG state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _check_heads(hidden: int, heads: int) -> int:
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    head_dim = hidden // heads
    if head_dim % 2 or head_dim < 6:
        raise ValueError(f"head_dim = hidden / heads = {head_dim} must be even and at least 6 (rotary embeddings)")
    return head_dim


def _kv_heads(heads: int) -> int:
    return heads // 2 if heads % 2 == 0 else heads


def build_tiny_qwen2(path: str, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0, extra_chars=()):
    """A random `Qwen2ForCausalLM` (vocabulary = the character tokenizer) and its tokenizer, saved to `path`.

    Returns `path`. Loadable with `AutoModelForCausalLM` / `AutoTokenizer` and OpenRLHF's `Actor`.
    """
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    _check_heads(hidden, heads)
    tokenizer = build_char_tokenizer(path, extra_chars=extra_chars)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=_kv_heads(heads), max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False,
    )
    model = _init_seeded(lambda: Qwen2ForCausalLM(config), seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    model.save_pretrained(path)
    return path


def _mrope_section(head_dim: int) -> list:
    """[t, h, w] summing to head_dim / 2, in Qwen2.5-VL's 2:3:3 proportion (e.g. [2, 3, 3] for head_dim 16)."""
    half = head_dim // 2
    hw = (3 * half) // 8
    return [half - 2 * hw, hw, hw]


def _load_processor_class(folder: str):
    """Write the processor's remote-code module into `folder` and import it (registered in sys.modules,
    so `save_pretrained` can find its source file)."""
    file = os.path.join(folder, _PROCESSOR_MODULE + ".py")
    with open(file, "w") as f:
        f.write(_PROCESSOR_SOURCE)
    name = f"openrlhf_sapo_demo_generated.{_PROCESSOR_MODULE}"
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return getattr(module, _PROCESSOR_CLASS)


def build_tiny_qwen2_5_vl(
    path: str,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    vision_depth: int = 2,
    vision_hidden: int = 32,
    seed: int = 0,
    max_image_tokens: int = 64,
    extra_chars=(),
    tie_word_embeddings: bool = False,
):
    """A random `Qwen2_5_VLForConditionalGeneration`, its tokenizer and processor, saved to `path`.
    `tie_word_embeddings=True` ties the LM head to the input embeddings, as Qwen2.5-VL-3B does.

    The config's image/video/vision-marker token ids are the tokenizer's. The processor
    (loaded with `AutoProcessor.from_pretrained(path, trust_remote_code=True)`) uses
    `Qwen2VLImageProcessorPil(min_pixels=28*28, max_pixels=max_image_tokens*28*28)`:
    one `<|image_pad|>` per 28x28 area. Returns `path`.
    """
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    head_dim = _check_heads(hidden, heads)
    if vision_hidden % 16:
        raise ValueError(f"vision_hidden ({vision_hidden}) must be a multiple of 16 (vision heads of 16 dims)")
    if max_image_tokens < 1:
        raise ValueError("max_image_tokens must be at least 1")
    os.makedirs(path, exist_ok=True)
    tokenizer = build_char_tokenizer(None, extra_chars=extra_chars)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=_kv_heads(heads), max_position_embeddings=4096,
            bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
            rope_scaling={"type": "mrope", "mrope_section": _mrope_section(head_dim)},
            tie_word_embeddings=tie_word_embeddings,
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
            num_heads=vision_hidden // 16, out_hidden_size=hidden, patch_size=PATCH_SIZE,
            spatial_merge_size=MERGE_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE,
            fullatt_block_indexes=[vision_depth - 1], window_size=2 * PATCH_SIZE * MERGE_SIZE,
        ),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END],
        eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], tie_word_embeddings=tie_word_embeddings,
    )
    model = _init_seeded(lambda: Qwen2_5_VLForConditionalGeneration(config), seed)
    model.generation_config = GenerationConfig(eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], bos_token_id=None)
    model.save_pretrained(path)

    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=IMAGE_TOKEN_PIXELS, max_pixels=max_image_tokens * IMAGE_TOKEN_PIXELS,
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
    )
    with tempfile.TemporaryDirectory() as tmp:
        processor_class = _load_processor_class(tmp)
        processor_class.register_for_auto_class("AutoProcessor")
        processor = processor_class(image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
        processor.save_pretrained(path)
    return path
