"""A tiny random Qwen2 checkpoint built offline, for the CPU vLLM pipeline-parallel check.

vLLM's CPU attention needs head_dim in {32, 64, 80, ...} (its qwen2 uses hidden / heads), so the
model has hidden 128 and 4 heads (head_dim 32); 4 layers so that each of 2 pipeline stages owns 2.
The tokenizer is byte-level BPE with no merges (one token per byte), made with `tokenizers`.
"""

from __future__ import annotations

import os

NUM_LAYERS = 4


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    return tok


def build_tiny_qwen2(path: str, seed: int = 0, init_std: float = 0.2, tie_word_embeddings: bool = False) -> str:
    """Write a random tiny Qwen2 (float32 safetensors) and its tokenizer to `path`; return `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=init_std,  # peaky logits: greedy decoding has no near-ties
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    import sys

    print(build_tiny_qwen2(sys.argv[1]))
