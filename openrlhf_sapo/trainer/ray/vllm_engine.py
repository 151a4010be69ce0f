"""vLLM pipeline parallelism for OpenRLHF's rollout engines (`--vllm.pipeline_parallel_size P`).

Each rollout engine gets P pipeline stages of TP GPUs (TP = `--vllm.tensor_parallel_size`), i.e.
TP * P GPUs. Upstream (openrlhf 0.11.2, `trainer/ray/vllm_engine.py`) never passes
`pipeline_parallel_size` to vLLM, and uses `vllm.tensor_parallel_size` as "GPUs per engine" for
the placement bundles (`num_engines * tp` bundles, `get_bundle_indices(pg, i, tp)`), the executor
backend ("uni" if 1 else "ray"), the colocation check (`cli/train_ppo_ray.py: train`) and the
weight-sync group (`trainer/ray/ppo_actor.py: _init_vllm_sync_group`: world size
`num_engines * tp + 1`, engine i's rank offset `i * tp + 1`).

Design
- `apply_pipeline_parallel(args)` (driver, before upstream's `train(args)`): for P > 1 it sets
  `args.vllm.tensor_parallel_size = TP * P` so that every one of those upstream uses counts all
  GPUs of an engine, records TP in `args.vllm.engine_tensor_parallel_size`, and rebinds
  `openrlhf.trainer.ray.vllm_engine.RolloutRayActor` (see `REBOUND`) to a remote subclass.
  Rebinding in the driver is enough: `create_vllm_engines` is only called by `cli/train_ppo_ray.py:
  train` in the driver, and it looks `RolloutRayActor` up in its module's globals at call time
  (`cli/train_ppo_ray.py` imports the function, not the class); no other upstream code creates
  rollout actors.
- The subclass (`make_rollout_actor_class(P)`) takes upstream's kwargs, where
  `tensor_parallel_size` means GPUs per engine, and gives vLLM `tensor_parallel_size = gpus // P`
  and `pipeline_parallel_size = P`. P is a class attribute; the class is made inside a function,
  so Ray (and cloudpickle) pickle it by value, attribute included, and the worker needs nothing of
  this module. Upstream's own constructor does everything else.

Why the rest of upstream is then right, read in vLLM 0.29.0 and openrlhf 0.11.2:
- Placement: an engine gets TP * P bundle indices and backend "ray" (TP * P > 1). vLLM's Ray
  executors (`RayExecutorV2`, the default since VLLM_USE_RAY_V2_EXECUTOR_BACKEND defaults to 1, and
  `RayDistributedExecutor`) require `len(VLLM_RAY_BUNDLE_INDICES) == parallel_config.world_size`,
  which is PP * TP (* prefill-context-parallel, 1 here), and start one worker per bundle, rank r
  being stage r // TP, TP rank r % TP.
- Weight-sync ranks: each vLLM worker's default torch.distributed rank is its engine-global rank
  0..TP*P-1 (`init_worker_distributed_environment` with `parallel_config.world_size`), and
  `WorkerWrap.init_process_group` uses `get_rank() + rank_offset`; with the rewritten size the
  offsets `i * TP * P + 1` and world size `num_engines * TP * P + 1` give every worker of every
  stage its own rank. (Without the rewrite the group would be too small and engines' ranks would
  overlap, and the rendezvous would fail or hang.)
- Weight sync with pipeline stages works unchanged (no fix needed): `update_weight` is a
  `collective_rpc`, which vLLM runs on every worker of every stage (`MultiprocExecutor` and
  `RayExecutorV2` broadcast it through their message queue to all `world_size` workers;
  `RayDistributedExecutor.collective_rpc` loops over all workers), so every rank joins each
  broadcast and receives the full HF-named tensor, then calls
  `model_runner.model.load_weights([(name, tensor)])`. A stage's model holds `PPMissingLayer` in
  place of the decoder layers, embeddings, final norm and LM head it does not own (`make_layers`,
  e.g. Qwen2Model / LlamaModel / Qwen2ForCausalLM `__init__`); `AutoWeightsLoader._load_module`
  returns without loading anything for a `PPMissingLayer`/`StageMissingLayer`, and models with a
  hand-written loader skip with `is_pp_missing_parameter(name, self)`. This is the same path vLLM
  uses to load a checkpoint into a pipeline-parallel engine (every stage iterates the whole
  checkpoint), so every model that supports PP handles it. With tied embeddings the last stage also
  keeps `embed_tokens`, and both first and last stage load `model.embed_tokens.weight`. The TP
  split inside a stage is unchanged (each parameter's `weight_loader` takes its TP shard). The
  CUDA-IPC path (colocate_all + nccl) also holds: the hybrid engine's engines take TP * P bundles
  each of the actor's placement group, so every vLLM worker's GPU hosts a training rank whose
  handle it uses. Cost: a stage receives tensors it then discards, as every TP rank already
  receives the full tensor upstream.
  Checked on the CPU build (tests/vllm_pp_engine_check.py, run by
  tests/test_vllm_pipeline_parallel.py): with 2 stages, stage 0 loads exactly the embedding and
  layers 0-1, stage 1 exactly layers 2-3, the norm and the LM head, and after syncing other weights
  the PP=2 engine generates exactly what a PP=1 engine with those weights generates.
- Nothing new to install: an engine with P > 1 runs on the same vLLM Ray executor that upstream
  already uses for TP > 1 (`RayExecutorV2` by default; its stages talk over vLLM's own
  pipeline-parallel process group). Also on CPU (the CPU mode of the Ray path), where
  `utils/cpu_compat.vllm_plugin` lets vLLM's CPU platform take the declared GPUs: `make e2e` runs a
  PP=2 engine with one stage on each node of a 2-node cluster and checks the weight sync into both.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from ...upstream import conditional_replacement, prepare, rebind, upstream

# Every upstream name this module rebinds (module, attribute): upstream.rebind, at the run's choice.
REBOUND = (("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor"),)

_VLLM_ENGINE = "openrlhf.trainer.ray.vllm_engine"
_CLASSES: dict[int, Any] = {}


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def _engine_module():
    prepare()  # the pinned openrlhf, and the CPU stand-ins where there is no GPU
    return importlib.import_module(_VLLM_ENGINE)


def upstream_rollout_actor():
    """Upstream's `RolloutRayActor` remote class, also after `apply_pipeline_parallel` rebound it."""
    return upstream(_VLLM_ENGINE, "RolloutRayActor")


# vLLM engine options on a machine without CUDA: fp32 (the fast path of vLLM on CPU; bf16 has no
# fast kernels on CPUs without AVX-512-BF16), the gloo weight sync of SAPO's worker extension, and no
# sleep mode (it frees GPU memory through CUDA's allocator).
CPU_ENGINE_KWARGS = {"dtype": "float32", "enable_sleep_mode": False}


def make_rollout_actor_class(pipeline_parallel_size: int, cpu: bool = False):
    """A Ray remote subclass of upstream's rollout actor: P pipeline stages, and on CPU the CPU options.

    Its constructor takes upstream's kwargs (`tensor_parallel_size` = GPUs per engine, a multiple
    of P) and hands vLLM `tensor_parallel_size = gpus // P`, `pipeline_parallel_size = P` (and with
    `cpu`, CPU_ENGINE_KWARGS and SAPO's worker extension). One class per (P, cpu) (cached).
    `ray.remote` on a class does not start Ray.
    """
    P = _positive_int(pipeline_parallel_size, "pipeline_parallel_size")
    if (P, cpu) in _CLASSES:
        return _CLASSES[(P, cpu)]
    import ray

    from .vllm_worker_wrap import WORKER_EXTENSION

    upstream_remote = upstream_rollout_actor()
    base = upstream_remote.__ray_actor_class__
    cpu_kwargs = {**CPU_ENGINE_KWARGS, "worker_extension_cls": WORKER_EXTENSION} if cpu else {}

    class PipelineParallelRolloutActor(base):
        pipeline_parallel_size = P
        cpu_engine_kwargs = cpu_kwargs

        @classmethod
        def engine_parallel_kwargs(cls, kwargs: dict) -> dict:
            """Upstream's actor kwargs -> the kwargs for vLLM, with the GPUs split into stages."""
            pp = cls.pipeline_parallel_size
            if "pipeline_parallel_size" in kwargs:
                raise ValueError(
                    f"{cls.__name__} sets vLLM's pipeline_parallel_size itself ({pp}); it got "
                    f"pipeline_parallel_size={kwargs['pipeline_parallel_size']!r} as well"
                )
            gpus = kwargs.get("tensor_parallel_size")
            if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1 or gpus % pp:
                raise ValueError(
                    f"{cls.__name__} expects tensor_parallel_size = GPUs per engine = engine TP * "
                    f"pipeline_parallel_size ({pp}), a positive multiple of {pp} (apply_pipeline_parallel "
                    f"sets --vllm.tensor_parallel_size so); got {gpus!r}"
                )
            engine = {**kwargs, "tensor_parallel_size": gpus // pp, "pipeline_parallel_size": pp,
                      **cls.cpu_engine_kwargs}
            return engine

        async def __init__(self, *args, **kwargs):
            engine = self.engine_parallel_kwargs(kwargs)
            if self.cpu_engine_kwargs and engine["tensor_parallel_size"] * engine["pipeline_parallel_size"] > 1:
                # vLLM's CPU worker binds its OpenMP threads to entry `local_rank` of this list (the
                # workers run under vLLM's Ray executor, see cpu_compat.vllm_plugin).
                cpus = sorted(os.sched_getaffinity(0))
                workers = engine["tensor_parallel_size"] * engine["pipeline_parallel_size"]
                os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                                      "|".join(str(cpus[i % len(cpus)]) for i in range(workers)))
            await super().__init__(*args, **engine)

        async def last_sync_checksum(self) -> list:
            """Per vLLM worker, what it loaded in the last weight sync (vllm_worker_wrap.parameters_checksum)."""
            return await self.llm.collective_rpc("last_sync_checksum")

    name = f"PipelineParallel{P}{'Cpu' if cpu else ''}RolloutActor"
    PipelineParallelRolloutActor.__name__ = name
    PipelineParallelRolloutActor.__qualname__ = f"make_rollout_actor_class.<locals>.{name}"
    options = getattr(upstream_remote, "_default_options", None)  # upstream's @ray.remote(...) options
    cls = PipelineParallelRolloutActor
    remote = ray.remote(**options)(cls) if options else ray.remote(cls)
    _CLASSES[(P, cpu)] = conditional_replacement(remote, upstream_remote)
    return remote


def bind_rollout_actor(rollout_actor) -> bool:
    """Point upstream's `RolloutRayActor` at `rollout_actor` (upstream's or one of ours)."""
    module = _engine_module()
    if module.RolloutRayActor is rollout_actor:
        return False
    if rollout_actor is upstream_rollout_actor():  # back to upstream's (P == 1 after P > 1)
        setattr(module, "RolloutRayActor", rollout_actor)
    else:
        rebind(_VLLM_ENGINE, "RolloutRayActor", rollout_actor, upstream_rollout_actor())  # checks it was upstream's
    return True


def apply_pipeline_parallel(args, cpu: bool = False) -> dict:
    """Make upstream build pipeline-parallel rollout engines for `args.vllm.pipeline_parallel_size`.

    P > 1: `args.vllm.tensor_parallel_size` becomes TP * P (GPUs per engine; upstream's bundles,
    colocation check and weight-sync group then count every GPU), the engine's own TP is kept in
    `args.vllm.engine_tensor_parallel_size`, and upstream's `RolloutRayActor` is rebound to
    `make_rollout_actor_class(P)`. Idempotent. P == 1 (or unset): `args` is left alone and
    upstream's class is bound (it already is unless P > 1 was applied earlier in this process).
    Call it in the driver before upstream's `train(args)`. Returns what it did.
    """
    vllm_args = args.vllm
    P = getattr(vllm_args, "pipeline_parallel_size", None)
    P = 1 if P is None else _positive_int(P, "--vllm.pipeline_parallel_size")
    gpus = _positive_int(vllm_args.tensor_parallel_size, "--vllm.tensor_parallel_size")
    engine_tp = getattr(vllm_args, "engine_tensor_parallel_size", None)
    if engine_tp is not None and gpus != engine_tp * P:
        raise ValueError(
            f"args.vllm.engine_tensor_parallel_size={engine_tp} (set by an earlier apply_pipeline_parallel) "
            f"but --vllm.tensor_parallel_size={gpus} and --vllm.pipeline_parallel_size={P}: expected "
            f"tensor_parallel_size == {engine_tp} * {P}; the arguments changed after it was applied"
        )

    if P == 1 and not cpu:
        restored = bind_rollout_actor(upstream_rollout_actor())
        return {
            "pipeline_parallel_size": 1,
            "engine_tensor_parallel_size": gpus,
            "gpus_per_engine": gpus,
            "args_changed": {},
            "rebound": {f"{_VLLM_ENGINE}.RolloutRayActor": "upstream"} if restored else {},
        }

    changed = {}
    if engine_tp is None:
        engine_tp = gpus
        vllm_args.engine_tensor_parallel_size = engine_tp
        vllm_args.tensor_parallel_size = engine_tp * P
        changed = {
            "vllm.tensor_parallel_size": (engine_tp, engine_tp * P),
            "vllm.engine_tensor_parallel_size": (None, engine_tp),
        }
    cls = make_rollout_actor_class(P, cpu)
    rebound = bind_rollout_actor(cls)
    return {
        "pipeline_parallel_size": P,
        "engine_tensor_parallel_size": engine_tp,
        "gpus_per_engine": engine_tp * P,
        "args_changed": changed,
        "rebound": {f"{_VLLM_ENGINE}.RolloutRayActor": cls.__ray_actor_class__.__name__} if rebound else {},
    }
