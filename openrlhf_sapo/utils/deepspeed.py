"""`SapoDeepspeedStrategy` (the counterpart of openrlhf/utils/deepspeed/deepspeed.py): upstream's strategy,
whose `print` of a whole model (every worker prints its model's module tree, hundreds of lines per
role) becomes one line: the class and its parameter count. Everything else is upstream's."""

from __future__ import annotations

import torch.nn as nn

from ..upstream import replaces, upstream

DeepspeedStrategy = upstream("openrlhf.utils.deepspeed", "DeepspeedStrategy")


def describe_model(model: nn.Module) -> str:
    """`Qwen2ForCausalLM: 1.54B parameters` (ZeRO-3 partitions count whole)."""
    count = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.2f}M" if count >= 1e6 else str(count)
    return f"{type(model).__name__}: {size} parameters"


# get_strategy imports the name lazily from openrlhf.utils.deepspeed; elsewhere it is a type annotation.
@replaces("openrlhf.utils.deepspeed", "DeepspeedStrategy", also_in=(
    "openrlhf.utils.deepspeed.deepspeed", "openrlhf.trainer.ppo_trainer", "openrlhf.trainer.ppo_trainer_async",
    "openrlhf.trainer.ray.launcher", "openrlhf.trainer.ray.ppo_actor", "openrlhf.trainer.ray.ppo_critic"))
class SapoDeepspeedStrategy(DeepspeedStrategy):
    def print(self, *msg):
        super().print(*(describe_model(m) if isinstance(m, nn.Module) else m for m in msg))
