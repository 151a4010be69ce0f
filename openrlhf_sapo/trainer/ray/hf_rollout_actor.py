"""A Ray rollout actor on Hugging Face `generate`, for VLMs in the Ray path's CPU mode.

vLLM's Qwen2.5-VL needs torchvision, which has no build for the CPU torch 2.13 this project
pins, so on a machine without CUDA a VLM run's rollout engines are this actor instead of
upstream's `RolloutRayActor`: the same constructor kwargs (those `create_vllm_engines` passes), the
same methods the trainers call (`generate_responses`, `generate`, the weight-sync pair
`init_process_group` / `update_weight`, prefix cache / sleep / pause as no-ops), answered by the
single-process backend's `HFRolloutEngine` (trainer/local/hf_engine.py: batched `generate`,
vision special tokens never sampled). Weights arrive as upstream sends them to vLLM: one
broadcast per parameter from the actor's rank 0 over the gloo group of utils/distributed_util.py,
under the Hugging Face names the engine's own model has. `last_sync_checksum()` answers
`--vllm.check_weight_sync` as the vLLM workers do.

`patches.install_for_training` binds it (as `openrlhf.trainer.ray.vllm_engine.RolloutRayActor`) only
in CPU mode for a VLM (`--data.max_images_per_prompt > 0`).
"""

from __future__ import annotations

import os

from ...upstream import conditional_replacement, prepare, upstream


def make_hf_rollout_actor_class():
    """The remote class; built on call so that importing this module starts nothing."""
    import ray

    upstream_remote = upstream("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor")

    class HFRolloutRayActor:
        def __init__(self, *args, model: str, seed: int = 0, agent_func_path=None, remote_rm_url=None,
                     trust_remote_code: bool = True, **vllm_only_kwargs):
            import torch
            from transformers import AutoModelForImageTextToText, AutoProcessor

            from ..local.hf_engine import HFRolloutEngine

            prepare()
            torch.manual_seed(seed)
            if agent_func_path:
                executor = upstream("openrlhf.trainer.ray.vllm_engine", "_load_agent_executor")(agent_func_path)
            else:
                executor = upstream("openrlhf.utils.agent", "SingleTurnAgentExecutor")(remote_rm_url)
            processor = AutoProcessor.from_pretrained(model, trust_remote_code=trust_remote_code)
            hf_model = AutoModelForImageTextToText.from_pretrained(
                model, dtype=torch.float32, trust_remote_code=trust_remote_code, attn_implementation="sdpa")
            self.engine = HFRolloutEngine(hf_model, getattr(processor, "tokenizer", processor), executor,
                                          processor=processor, device="cpu")
            self._params = dict(hf_model.named_parameters())
            self._group = None
            self._sync_loaded = None
            self._last_sync_checksum = None
            print(f"[openrlhf_sapo] HF rollout engine for {os.path.basename(model.rstrip('/'))} on CPU "
                  f"(vLLM's VLM needs torchvision)", flush=True)

        async def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples=1,
                                     images=None):
            return await self.engine.generate_responses(prompt, label, sampling_params, max_length, hf_tokenizer,
                                                        num_samples=num_samples, images=images)

        async def generate(self, prompt_token_ids, sampling_params, multi_modal_data=None):
            return await self.engine.generate(prompt_token_ids, sampling_params, multi_modal_data)

        def get_num_unfinished_requests(self) -> int:
            return self.engine.get_num_unfinished_requests()

        # ------------------------------------------------------------ weight sync (the actor's rank 0 is rank 0)

        def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend,
                               use_ray):
            from ...utils.distributed_util import stateless_init_process_group

            self._group = stateless_init_process_group(master_address, master_port, rank_offset, world_size, "cpu")

        def update_weight(self, name, dtype, shape, empty_cache=False):
            import torch

            from .vllm_worker_wrap import parameters_checksum

            if name not in self._params:
                raise KeyError(f"the HF rollout engine has no parameter {name!r} (the actor is a different model?)")
            weight = torch.empty(shape, dtype=dtype)
            self._group.broadcast(weight, src=0)
            with torch.no_grad():
                self._params[name].copy_(weight)
            self._sync_loaded = (self._sync_loaded or []) + [(name, weight)]
            if empty_cache:  # upstream's mark of the last tensor of a sync round
                self._last_sync_checksum = parameters_checksum(self._sync_loaded)
                self._sync_loaded = None

        def last_sync_checksum(self) -> list:
            return [self._last_sync_checksum]

        # ------------------------------------------------------------ vLLM-only controls: nothing to do here

        def reset_prefix_cache(self):
            return None

        def sleep(self, level=1):
            return None

        def wake_up(self, tags=None):
            return None

        def pause_generation(self):
            return None

        def resume_generation(self):
            return None

    options = getattr(upstream_remote, "_default_options", None)
    remote = ray.remote(**options)(HFRolloutRayActor) if options else ray.remote(HFRolloutRayActor)
    return conditional_replacement(remote, upstream_remote)
