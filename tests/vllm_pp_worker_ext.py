"""vLLM worker extension for the CPU pipeline-parallel check (tests/vllm_pp_engine_check.py).

Imported inside every vLLM worker (as `worker_extension_cls`) before the model is built.

CPU-build accommodation, applied at import: vLLM's CPU platform prepacks linear and LM-head
weights for its GEMM kernels after loading (`dispatch_cpu_unquantized_gemm`) and, for linear
layers, replaces the parameter with an empty tensor, so `load_weights` cannot update a running CPU
engine at all, with or without pipeline parallelism ("Attempted to load weight (torch.Size([128,
256])) into parameter (torch.Size([0]))"). On GPU, unquantized weights stay plain parameters,
which is what OpenRLHF's in-place weight sync relies on. Here every such layer keeps its
parameter and computes with `torch.nn.functional.linear` on it, as on GPU.
"""

from __future__ import annotations

import os

import torch
import vllm.model_executor.layers.utils as _layer_utils


def _dispatch_keeping_weights(layer, remove_weight: bool) -> None:
    layer.cpu_linear = lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias)


_layer_utils.dispatch_cpu_unquantized_gemm = _dispatch_keeping_weights


class PipelineCheckExtension:
    def allocate_pp_receive_buffer(self) -> bool:
        """Allocate a non-first stage's activation buffer as vLLM's `_dummy_run` does.

        With enforce_eager=True the CPU model runner skips its warm-up run, which is what
        allocates it, and the first step then fails (`assert self.intermediate_tensors is not None`).
        """
        from vllm.distributed import get_pp_group

        runner = self.model_runner
        if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
            return False
        runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
            batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device
        )
        return True

    def sync_weights_from(self, path: str) -> dict:
        """Per parameter, what OpenRLHF's WorkerWrap.update_weight does once the broadcast arrived:
        check the dtype, then `self.model_runner.model.load_weights(weights=[(name, weight)])`."""
        from safetensors.torch import load_file
        from vllm.distributed import get_pp_group

        loaded: list[str] = []
        for name, weight in load_file(os.path.join(path, "model.safetensors")).items():
            assert weight.dtype == self.model_config.dtype, f"mismatch dtype: {weight.dtype} {self.model_config.dtype}"
            loaded += sorted(self.model_runner.model.load_weights(weights=[(name, weight)]))
        return {
            "pp_rank": get_pp_group().rank_in_group,
            "rank": torch.distributed.get_rank(),
            "world_size": torch.distributed.get_world_size(),
            "loaded": loaded,
            "owned": sorted(n for n, _ in self.model_runner.model.named_parameters()),
        }
