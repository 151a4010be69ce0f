"""The actor worker of the single-process backend (the counterpart of trainer/ray/ppo_actor.py).

SAPO's actor worker (upstream's PolicyModelActor plus the rollout entropy), whose
`broadcast_to_vllm` copies the trained weights into the in-process HF rollout engine instead of
broadcasting them to vLLM over NCCL (ZeRO-3 parameters are gathered first, as upstream does).
"""

from __future__ import annotations

import contextlib

from ..ray.ppo_actor import SapoPolicyModelActor


class LocalPolicyModelActor(SapoPolicyModelActor.__ray_actor_class__):
    rollout_engine = None  # set by the launcher once the engine exists

    def broadcast_to_vllm(self):
        if self.rollout_engine is None:
            return 0
        model = getattr(self.actor.model, "module", self.actor.model)  # the DeepSpeed engine's module
        params = list(model.named_parameters())
        gather = contextlib.nullcontext()
        if self.strategy.args.ds.zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([p for _, p in params])
        with gather:
            return self.rollout_engine.load_weights(params)
