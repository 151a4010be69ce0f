"""SAPO's vLLM worker extension (the counterpart of openrlhf/trainer/ray/vllm_worker_wrap.py).

vLLM imports this class by name in each of its worker processes (`worker_extension_cls`), so the
module goes through openrlhf_sapo.upstream first (the pinned openrlhf, and the CPU stand-ins on a machine
without CUDA, where those processes start with nothing prepared).

- On a GPU every upstream method runs unchanged.
- On CPU the weight sync is upstream's broadcast from the actor's rank 0 over a gloo
  group (utils/distributed_util.py) instead of NCCL: `update_weight` receives the tensor in the
  trainer's dtype on CPU and casts it to the engine's (vLLM on CPU serves fp32 here even for a bf16
  actor; upstream asserts equal dtypes because it receives straight into the engine's dtype).
  vLLM on CPU repacks every linear weight into a oneDNN / SGL kernel after loading and drops the
  parameter, so a plain `load_weights` finds nothing to load into; a sync round is therefore
  vLLM's layerwise reload (`initialize_layerwise_reload` before the first tensor, each layer
  re-processed as its tensors land, `finalize_layerwise_reload` after the last one, which upstream
  marks with `empty_cache=True`), the path vLLM's own `reload_weights` takes.
- `last_sync_checksum()`: float64 sum, sum of squares and element count of what this worker loaded
  in its last sync round, to compare with what the actor sent (the repacked kernels cannot be
  summed, so the check is on the loaded tensors, in the trainer's dtype).
"""

from __future__ import annotations

from ...upstream import upstream
from ...utils.distributed_util import stateless_init_process_group

UpstreamWorkerWrap = upstream("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap")

# What `worker_extension_cls` names for engines that use this class.
WORKER_EXTENSION = f"{__name__}.WorkerWrap"


def parameters_checksum(named_parameters) -> dict:
    """{"sum", "sum_sq", "count"} of the parameters, in float64."""
    total, total_sq, count = 0.0, 0.0, 0
    for _, param in named_parameters:
        data = param.detach().double()
        total += float(data.sum())
        total_sq += float((data * data).sum())
        count += data.numel()
    return {"sum": total, "sum_sq": total_sq, "count": count}


class WorkerWrap(UpstreamWorkerWrap):
    def _on_cpu(self) -> bool:
        return self.device.type == "cpu"

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl",
                           use_ray=False):
        if not self._on_cpu() or use_ray:
            return super().init_process_group(master_address, master_port, rank_offset, world_size, group_name,
                                              backend=backend, use_ray=use_ray)
        import torch

        rank = torch.distributed.get_rank() + rank_offset
        self._model_update_with_ray = False
        self._model_update_group = stateless_init_process_group(master_address, master_port, rank, world_size,
                                                                self.device)

    def update_weight(self, name, dtype, shape, empty_cache=False):
        if not self._on_cpu() or self._model_update_with_ray:
            return super().update_weight(name, dtype, shape, empty_cache)
        import torch

        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = self.model_runner.model
        if not getattr(self, "_sync_loaded", None):
            initialize_layerwise_reload(model)
            self._sync_loaded = []
        weight = torch.empty(shape, dtype=dtype, device=self.device)
        self._model_update_group.broadcast(weight, src=0)
        self._sync_loaded.append((name, weight))
        model.load_weights(weights=[(name, weight.to(self.model_config.dtype))])
        if empty_cache:  # upstream's mark of the last tensor of a sync round
            finalize_layerwise_reload(model, self.model_config)
            self._last_sync_checksum = parameters_checksum(self._sync_loaded)
            self._sync_loaded = None

    def last_sync_checksum(self) -> dict:
        """What this worker loaded in the last sync, and the Ray node it runs on (None outside Ray)."""
        import ray

        checksum = getattr(self, "_last_sync_checksum", None)
        node = ray.util.get_node_ip_address() if ray.is_initialized() else None
        return None if checksum is None else dict(checksum, node=node)
