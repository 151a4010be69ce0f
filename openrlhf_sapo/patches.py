"""The top of the package's import graph: make upstream OpenRLHF build SAPO's classes in this process.

`apply_patches()` imports every module that declares a replacement (`@replaces` in upstream.py's
registry), rebinds each one where its registry row says, then sweeps `sys.modules`: an `openrlhf.*`
module that still binds an upstream original which has a replacement (say it did
`from openrlhf.trainer.ppo_utils.experience import Experience` and is not in the row's list) would
build upstream's object mid-run, so the sweep fails at once naming the module. It runs in the
driver before any Ray actor is created and at the start of every Ray worker SAPO creates
(upstream.sapo_remote_class). `install_for_training(args)` is what the CLIs call before training.
"""

from __future__ import annotations

import os
import sys
from typing import List

from . import upstream as _upstream
from .upstream import REPLACEMENTS, UPSTREAM_RAY_ENV_VARS, UpstreamMismatch, prepare, rebind
from .utils import cpu_compat

# Every module holding a @replaces declaration; importing them fills the registry.
from .models import utils as _models_utils  # noqa: F401  compute_entropy (chunked)
from .models import vlm_critic as _vlm_critic  # noqa: F401  load_critic
from .trainer import ppo_trainer as _ppo_trainer  # noqa: F401  the remote trainers
from .trainer.ppo_utils import experience as _experience  # noqa: F401  SegmentExperience
from .trainer.ppo_utils import experience_maker as _experience_maker  # noqa: F401  SegmentExperienceMaker
from .trainer.ray import ppo_actor as _ppo_actor  # noqa: F401  actor trainer and worker
from .trainer.ray import ppo_critic as _ppo_critic  # noqa: F401  critic trainer and worker
from .utils import deepspeed as _deepspeed  # noqa: F401  SapoDeepspeedStrategy

_applied = False


def apply_patches() -> None:
    """Rebind every registered replacement, then check no upstream module still binds an original.
    Idempotent; safe for every estimator (SAPO's classes behave exactly as upstream's unless the
    estimator is sapo)."""
    global _applied
    if _applied:
        return
    prepare()
    for row in REPLACEMENTS:
        for module in row.rebind_in:
            rebind(module, row.attribute, row.replacement, row.original)
    check_no_original_left()
    _applied = True


def originals_left() -> List[str]:
    """`module.name` for each imported openrlhf module binding an upstream original that has a
    replacement, outside the modules its registry row says keep it."""
    rows = {}
    for row in REPLACEMENTS:
        rows.setdefault(row.original, row)
    left = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "openrlhf" or name.startswith("openrlhf.")):
            continue
        for attribute, value in list(vars(module).items()):
            try:
                row = rows.get(value)
            except TypeError:  # unhashable values are never originals
                continue
            if row is not None and name not in row.kept_in and name not in row.rebind_in:
                left.append(f"{name}.{attribute}")
    return sorted(left)


def check_no_original_left() -> None:
    left = originals_left()
    if left:
        raise UpstreamMismatch(
            "these upstream modules still bind an object openrlhf_sapo replaces, so they would build "
            f"upstream's instead of SAPO's: {', '.join(left)}. Add each module to the `also_in` (or, "
            "with a reason, `kept_in`) of the replacement's @replaces declaration "
            f"(openrlhf=={_upstream.OPENRLHF_VERSION} changed?)"
        )


def install_for_training(args, ray_driver: bool = False) -> list:
    """Everything a driver needs before training: the patches and vLLM pipeline parallel. With
    `ray_driver` (the Ray CLI, before upstream's train(args)) on a machine without CUDA, also the CPU
    mode: changed options, CPU engines, Ray started or joined with every worker prepared for CPU.
    The single-process backend passes no `ray_driver` and starts no Ray. Returns what the CPU mode
    did, one line each."""
    cpu_ray = ray_driver and not cpu_compat.has_cuda()
    if ray_driver and not cpu_ray and getattr(args.vllm, "check_weight_sync", False):
        raise ValueError("--vllm.check_weight_sync is only implemented for CPU runs (vLLM on CPU with SAPO's gloo weight "
                         "sync); drop it on a GPU machine")
    apply_patches()
    from .trainer.ray.vllm_engine import apply_pipeline_parallel, bind_rollout_actor

    notes = []
    if cpu_ray:  # a GPU machine skips all of this: upstream's options and its own ray.init
        notes += cpu_compat.adapt_ray_args_for_cpu(args)  # idempotent: the CLI applied them before validation
    apply_pipeline_parallel(args, cpu=cpu_ray)
    if cpu_ray and args.vllm.num_engines and args.data.max_images_per_prompt > 0:
        from .trainer.ray.hf_rollout_actor import make_hf_rollout_actor_class

        bind_rollout_actor(make_hf_rollout_actor_class())
        notes.append("rollout engines: Hugging Face generate in Ray actors (vLLM's VLMs need torchvision, which "
                     "has no build for this CPU torch)")
    if cpu_ray:
        env = {name: os.environ.get(name, default) for name, default in UPSTREAM_RAY_ENV_VARS}
        notes.append(cpu_compat.start_or_join_ray_on_cpu(args, env))
    return notes
