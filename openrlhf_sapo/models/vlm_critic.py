"""A value model for vision-language models (OpenRLHF 0.11.2 has none).

OpenRLHF's critic is a text model (`get_llm_for_sequence_regression` cannot even read a
Qwen2.5-VL config: its hidden size lives in `text_config`), and its critic forward takes no
images. `VLMCritic` is the VLM's own image-text-to-text class with the LM head replaced by a
value head, so it loads the VLM checkpoint with transformers' own key conversions (registered
for the subclass, since transformers 5 looks conversions up by class name), receives the same
multi-modal inputs as the actor, saves and loads like any PreTrainedModel (upstream's
`--critic.save_value_network` path), and can freeze its vision tower.

`load_critic(...)` takes upstream's arguments and dispatches: a config with `vision_config`
gets a VLMCritic, anything else upstream's critic. patches.py rebinds it as
`ppo_critic.get_llm_for_sequence_regression`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Optional

import torch
import torch.nn as nn

from ..upstream import replaces, upstream
from ..utils.vlm_utils import is_vlm_config

get_llm_for_sequence_regression = upstream("openrlhf.models", "get_llm_for_sequence_regression")
set_z3_leaf_modules = upstream("openrlhf.models.utils", "set_z3_leaf_modules")


@functools.lru_cache(maxsize=None)
def vlm_critic_class(generation_class: type) -> type:
    """The critic class for one VLM architecture (e.g. Qwen2_5_VLForConditionalGeneration)."""
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    class VLMCritic(generation_class):
        # No LM head: nothing to tie (a tied head would otherwise be re-created on load).
        _tied_weights_keys = {}
        _keys_to_ignore_on_load_unexpected = [r"^lm_head\."]

        def __init__(self, config):
            super().__init__(config)
            del self.lm_head
            hidden = config.get_text_config().hidden_size
            self.value_head_prefix = getattr(config, "value_head_prefix", "score")
            setattr(self, self.value_head_prefix, nn.Linear(hidden, 1, bias=False))
            self.packing_samples = False  # refused for VLMs: packing breaks image/token alignment
            self.normalize_reward = getattr(config, "normalize_reward", False)
            self.register_buffer("mean", torch.zeros(1), persistent=False)
            self.register_buffer("std", torch.ones(1), persistent=False)
            if hasattr(config, "mean"):
                self.mean[0] = config.mean
                self.std[0] = config.std
            self.post_init()

        def mm_token_type_inputs(self, input_ids: torch.Tensor, mm_inputs: dict) -> dict:
            """The token-type mask the VLM needs for the whole sequence (the processor made it for the prompt only)."""
            if not mm_inputs:
                return {}
            types = (input_ids == self.config.image_token_id).to(torch.int32)
            if getattr(self.config, "video_token_id", None) is not None:
                types[input_ids == self.config.video_token_id] = 2
            key = "mm_token_type_ids" if "image_grid_thw" in mm_inputs else "token_type_ids"
            return {key: types}

        def forward(
            self,
            input_ids: torch.LongTensor = None,
            action_mask: Optional[torch.Tensor] = None,
            attention_mask: Optional[torch.Tensor] = None,
            return_output: bool = False,
            ring_attn_group=None,
            packed_seq_lens=None,
            **mm_inputs,
        ):
            if ring_attn_group is not None:
                raise ValueError("the VLM critic does not support ring attention (it needs unpacked sequences)")
            mm_inputs = {k: v for k, v in mm_inputs.items() if v is not None}
            mm_inputs.update(self.mm_token_type_inputs(input_ids, mm_inputs))
            # position_ids=None: the VLM computes its own (M-RoPE for Qwen-VL).
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **mm_inputs)
            if action_mask is None:
                assert return_output
                return outputs
            values = getattr(self, self.value_head_prefix)(outputs["last_hidden_state"]).squeeze(-1)[:, :-1]
            if self.normalize_reward:
                values = (values - self.mean) / self.std
            action_values = values[:, -action_mask.shape[1] :] * action_mask.float()
            return (action_values, outputs) if return_output else action_values

    VLMCritic.__name__ = VLMCritic.__qualname__ = f"{generation_class.__name__}Critic"
    base_mapping = get_checkpoint_conversion_mapping(generation_class.__name__)
    if base_mapping is not None:
        register_checkpoint_conversion_mapping(VLMCritic.__name__, base_mapping, overwrite=True)
    return VLMCritic


def get_vlm_critic(
    model_name_or_path: str,
    *,
    param_dtype: str = "bf16",
    attn_implementation: str = "sdpa",
    normalize_reward: bool = False,
    init_value_head: bool = False,
    value_head_prefix: str = "score",
    ds_config: Optional[dict] = None,
    freeze_visual_encoder: bool = False,
    lora_rank: int = 0,
    load_in_4bit: bool = False,
    packing_samples: bool = False,
    **kwargs,
) -> nn.Module:
    """Load a VLM checkpoint (or a saved VLM critic) as a critic; the value head is initialised
    as upstream initialises its critic's (normal, std 1 / (hidden + 1)) when `init_value_head`."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    if packing_samples:
        raise ValueError("the VLM critic cannot pack samples (--ds.packing_samples): images and tokens must stay aligned")
    if lora_rank > 0 or load_in_4bit:
        raise ValueError("the VLM critic supports neither LoRA nor 4-bit loading yet; train it in full precision")
    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)
    if not is_vlm_config(config):
        raise ValueError(f"{model_name_or_path} is not a vision-language model (its config has no vision_config)")
    config.normalize_reward = normalize_reward
    config._attn_implementation = attn_implementation
    config.value_head_prefix = getattr(config, "value_head_prefix", value_head_prefix)
    try:
        generation_class = AutoModelForImageTextToText._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"{type(config).__name__} has no AutoModelForImageTextToText class to build a critic from") from None
    from openrlhf.utils.utils import convert_to_torch_dtype

    # Keep the ZeRO-3 context alive through from_pretrained (as upstream does for its critic).
    dschf = HfDeepSpeedConfig(ds_config) if ds_config and ds_config["zero_optimization"]["stage"] == 3 else None
    critic = vlm_critic_class(generation_class).from_pretrained(
        model_name_or_path, config=config, trust_remote_code=True, dtype=convert_to_torch_dtype(param_dtype), **kwargs
    )
    set_z3_leaf_modules(critic, detect_hybrid=False)  # as upstream's critic: MoE blocks gather whole under ZeRO-3
    critic.config.use_cache = False
    if init_value_head:
        head = getattr(critic, critic.value_head_prefix)
        std = 1 / (config.get_text_config().hidden_size + 1)
        if dschf is not None:
            import deepspeed

            with deepspeed.zero.GatheredParameters([head.weight], modifier_rank=0):
                if torch.distributed.get_rank() == 0:
                    head.weight.data.normal_(mean=0.0, std=std)
        else:
            head.weight.data.normal_(mean=0.0, std=std)
    if freeze_visual_encoder:
        critic.model.visual.requires_grad_(False)
    return critic


# Options upstream's call site cannot pass (it has a fixed argument list): set by the critic
# worker around upstream's init_model_from_pretrained.
_VLM_CRITIC_OPTIONS: contextvars.ContextVar = contextvars.ContextVar("vlm_critic_options", default={})


@contextlib.contextmanager
def vlm_critic_options(**options):
    token = _VLM_CRITIC_OPTIONS.set(options)
    try:
        yield
    finally:
        _VLM_CRITIC_OPTIONS.reset(token)


@replaces("openrlhf.trainer.ray.ppo_critic", "get_llm_for_sequence_regression", kept_in={
    "openrlhf.models": "package export; load_critic calls upstream's for text critics",
    "openrlhf.models.model": "defines it",
    "openrlhf.trainer.ray.launcher": "the reward model worker: a reward model is not SAPO's critic",
    "openrlhf.cli.train_rm": "another entry point (reward model training)",
    "openrlhf.cli.serve_rm": "another entry point (reward model serving)",
})
def load_critic(model_name_or_path: str, model_type: str, **kwargs) -> nn.Module:
    """Upstream's `get_llm_for_sequence_regression`, with VLM critics built by `get_vlm_critic`."""
    from transformers import AutoConfig

    if model_type == "critic" and is_vlm_config(AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=True)):
        kwargs.update(_VLM_CRITIC_OPTIONS.get())
        kwargs.pop("experts_implementation", None)
        kwargs.pop("lora_alpha", None), kwargs.pop("lora_dropout", None), kwargs.pop("target_modules", None)
        kwargs.pop("device_map", None)
        return get_vlm_critic(model_name_or_path, **kwargs)
    return get_llm_for_sequence_regression(model_name_or_path, model_type, **kwargs)

