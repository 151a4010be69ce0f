"""The seam to upstream OpenRLHF: the one module that imports it for the rest of the project.

It checks the installed openrlhf is the pinned release (our extensions are written against
its internals), prepares a CPU-only process (utils/cpu_compat.py), lists every upstream symbol
the project uses, subclasses, wraps or rebinds, and applies the rebindings:

- `apply_patches()` makes upstream build SAPO's classes (SegmentExperience,
  SegmentExperienceMaker, SegmentActorPPOTrainer, and SAPO's remote trainer/actor classes).
  It runs in the driver before any Ray actor is created AND at the start of every Ray worker
  SAPO creates (`sapo_remote_class`): Ray pickles remote classes by value with the module
  globals they reference as the driver had them, while plain classes are imported afresh
  in each worker; patching on both sides covers both. Each rebinding checks that it replaces
  the upstream object it expects, so an upstream change fails here with a clear message.
- `install_for_training(args)` is what the CLI calls before upstream's `train(args)`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect

from . import OPENRLHF_VERSION
from .utils import cpu_compat


class UpstreamMismatch(ImportError):
    """The installed openrlhf is not the release this project extends."""


def check_openrlhf_version() -> str:
    try:
        installed = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        raise UpstreamMismatch(
            f"openrlhf is not installed; openrlhf_sapo extends openrlhf=={OPENRLHF_VERSION}: "
            "run `make install` (CPU) or `pip install -e .[gpu]`"
        ) from None
    if installed != OPENRLHF_VERSION:
        raise UpstreamMismatch(
            f"openrlhf {installed} is installed but openrlhf_sapo extends openrlhf=={OPENRLHF_VERSION} "
            f"(it subclasses upstream internals); install it with pip install openrlhf=={OPENRLHF_VERSION}"
        )
    return installed


# (module, attribute, how we use it). Every upstream symbol the project touches.
UPSTREAM_SYMBOLS = (
    ("openrlhf.models.loss", "PolicyLoss", "subclassed: SegmentPolicyLoss (segment ratio); bench baseline"),
    ("openrlhf.models.loss", "ValueLoss", "bench baseline; the critic keeps it, on a boundary mask"),
    ("openrlhf.trainer.ppo_utils.experience", "Experience", "subclassed: SegmentExperience; rebound"),
    ("openrlhf.trainer.ppo_utils.experience", "tensor_field", "declares SegmentExperience's fields"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker", "subclassed: SegmentExperienceMaker"),
    ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer", "subclassed: SegmentActorPPOTrainer; rebound"),
    ("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor", "remote subclass: entropy in the experience forward"),
    ("openrlhf.trainer.ray.ppo_critic", "CriticModelActor", "remote subclass: boundary-masked buffer, VLM inputs"),
    ("openrlhf.trainer.ray.ppo_critic", "CriticPPOTrainer", "subclassed: VLM inputs in the training step; rebound"),
    ("openrlhf.utils.vlm_utils", "merge_mm_train_inputs", "merges VLM inputs for the critic as for the actor"),
    ("openrlhf.trainer.ppo_trainer", "PPOTrainer", "remote subclass applying the patches in its worker"),
    ("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync", "remote subclass applying the patches"),
    ("openrlhf.trainer.ppo_trainer_async", "TrainingActor", "remote subclass applying the patches"),
    ("openrlhf.trainer.ppo_trainer_async", "GenerateSamplesActor", "remote subclass applying the patches"),
    ("openrlhf.models", "get_llm_for_sequence_regression", "wrapped by load_critic: VLM configs get VLMCritic"),
    ("openrlhf.trainer.ray.ppo_critic", "get_llm_for_sequence_regression", "rebound to load_critic"),
    ("openrlhf.cli.train_ppo_ray", "train", "called by our CLI after our validation and the patches"),
    ("openrlhf.utils.deepspeed", "DeepspeedStrategy", "subclassed: a model prints as one line; rebound for get_strategy"),
    ("openrlhf.models.utils", "log_probs_from_logits", "bench baseline: the experience forward's log-prob pass"),
    ("openrlhf.models.utils", "set_z3_leaf_modules", "the VLM critic marks ZeRO-3 leaf modules as upstream's critic does"),
    ("openrlhf.models.utils", "compute_entropy", "wrapped: chunked (memory-safe) when no gradient is needed"),
    ("openrlhf.models.actor", "compute_entropy", "rebound to the wrapper, for the experience forward"),
    ("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor", "remote subclass: vLLM pipeline parallel"),
    ("openrlhf.trainer.ray.vllm_engine", "create_vllm_engines", "tests check bundles and engine args for pipeline parallel"),
    ("openrlhf.trainer.ray.vllm_worker_wrap", "WorkerWrap", "subclassed: gloo weight sync on CPU, weights checksum"),
    # The single-process backend (trainer/local, cli/train_local.py) runs these in one process.
    ("openrlhf.trainer.ray.launcher", "ReferenceModelActor", "local backend: the reference model worker"),
    ("openrlhf.trainer.ray.launcher", "RewardModelActor", "local backend: the reward model worker"),
    ("openrlhf.trainer.ray.vllm_engine", "_load_agent_executor", "local backend: --train.agent_func_path"),
    ("openrlhf.utils.agent", "SingleTurnAgentExecutor", "local backend: tokenisation, VLM inputs, reward_func"),
    ("openrlhf.utils", "get_strategy", "local backend: one DeepspeedStrategy per worker, as in Ray"),
    ("openrlhf.utils.utils", "get_tokenizer", "local backend: the trainer's tokenizer / VLM processor"),
    ("openrlhf.utils.utils", "is_vlm_model", "local backend: which HF class the rollout engine loads"),
)

# Upstream modules that call the `ray` module at run time and that the single-process backend
# runs in one process; `local_ray()` swaps their `ray` for an in-process object store offering
# exactly these calls (checked against their source).
LOCAL_RAY_MODULES = (
    "openrlhf.trainer.ppo_trainer",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_utils.samples_generator",
)
LOCAL_RAY_CALLS = frozenset({"get", "put", "wait"})


# Upstream code the project runs from the installed source files rather than by import
# (openrlhf_sapo/cli/train_ppo_ray.py checks the structure it expects and fails clearly).
UPSTREAM_SOURCE_READS = (
    ("openrlhf.cli.train_ppo_ray", "__main__ block: the argparse parser and the argument validation"),
    ("openrlhf.utils.config", "hierarchize, loaded alone (openrlhf.utils' __init__ imports DeepSpeed)"),
)


def prepare() -> None:
    check_openrlhf_version()
    cpu_compat.apply()


def upstream(module: str, attribute: str):
    """Import one listed upstream symbol after the version check and CPU preparation."""
    if (module, attribute) not in {(m, a) for m, a, _ in UPSTREAM_SYMBOLS}:
        raise KeyError(f"{module}.{attribute} is not listed in openrlhf_sapo.seam.UPSTREAM_SYMBOLS; add it there")
    prepare()
    try:
        # Upstream's own object, also after apply_patches() rebound the name to SAPO's.
        return _upstream_original(getattr(importlib.import_module(module), attribute))
    except (ImportError, AttributeError) as err:
        raise UpstreamMismatch(f"openrlhf=={OPENRLHF_VERSION} should provide {module}.{attribute}: {err}") from err


def replaced_by(replacement):
    """The upstream object a SAPO replacement stands for: a remote class records it, a plain
    subclass is its first base."""
    return vars(replacement).get("__sapo_replaces__") or replacement.__bases__[0]


def _upstream_original(obj):
    """The upstream object behind obj (obj itself unless it is one of SAPO's replacements)."""
    is_ours = "__sapo_replaces__" in getattr(obj, "__dict__", {}) or (
        isinstance(obj, type) and obj.__module__.startswith("openrlhf_sapo")
    )
    return replaced_by(obj) if is_ours else obj


def rebind(module: str, attribute: str, replacement) -> None:
    """Point `module.attribute` at SAPO's replacement, checking it was upstream's object."""
    mod = importlib.import_module(module)
    current = getattr(mod, attribute, None)
    if current is replacement:
        return
    expected = replaced_by(replacement)
    if _upstream_original(current) is not expected:
        raise UpstreamMismatch(
            f"{module}.{attribute} is {current!r}, not the upstream object openrlhf_sapo replaces "
            f"({expected!r}); openrlhf=={OPENRLHF_VERSION} changed or another patch ran first"
        )
    setattr(mod, attribute, replacement)


def seed_from_strategy(args, kwargs) -> None:
    """Seed torch/numpy/random with `--train.seed` before an upstream trainer builds its prompt loader
    (which draws its shuffling seed from torch's global generator); upstream never seeds that
    process, so its prompt order would differ from run to run. `strategy` is the second argument
    of PPOTrainer and GenerateSamplesActor."""
    import transformers

    strategy = kwargs["strategy"] if "strategy" in kwargs else args[1]
    transformers.set_seed(strategy.args.train.seed)


def sapo_remote_class(remote_cls, mixin=None, before_init=None):
    """A Ray remote subclass of an upstream remote class that applies the patches in its worker.

    `mixin` adds or overrides methods (it precedes the upstream class in the MRO);
    `before_init(args, kwargs)` runs after the patches, before upstream's constructor. The Ray
    options (e.g. num_gpus=1) are upstream's.
    """
    import ray

    base = remote_cls.__ray_actor_class__

    def prepare_worker(args, kwargs):
        apply_patches()
        if before_init is not None:
            before_init(args, kwargs)

    if inspect.iscoroutinefunction(base.__init__):

        async def __init__(self, *args, **kwargs):
            prepare_worker(args, kwargs)
            await base.__init__(self, *args, **kwargs)

    else:

        def __init__(self, *args, **kwargs):
            prepare_worker(args, kwargs)
            base.__init__(self, *args, **kwargs)

    bases = (mixin, base) if mixin is not None else (base,)
    cls = type(f"Sapo{base.__name__}", bases, {"__init__": __init__, "__module__": mixin.__module__ if mixin is not None else __name__})
    remote = ray.remote(**remote_cls._default_options)(cls) if remote_cls._default_options else ray.remote(cls)
    remote.__sapo_replaces__ = remote_cls
    return remote


_applied = False


def patch_table():
    """(module, attribute, replacement) for every rebinding, driver and workers alike."""
    from .models.utils import compute_entropy
    from .models.vlm_critic import load_critic
    from .trainer.ppo_trainer import (
        SapoGenerateSamplesActor,
        SapoPPOTrainer,
        SapoPPOTrainerAsync,
        SapoTrainingActor,
    )
    from .trainer.ppo_utils.experience import SegmentExperience
    from .trainer.ppo_utils.experience_maker import SegmentExperienceMaker
    from .trainer.ray.ppo_actor import SapoPolicyModelActor, SegmentActorPPOTrainer
    from .trainer.ray.ppo_critic import SapoCriticModelActor, SegmentCriticPPOTrainer
    from .utils.deepspeed import SapoDeepspeedStrategy

    experience_users = (
        "openrlhf.trainer.ppo_utils.experience",  # concat/split/make_experience_batch build it
        "openrlhf.trainer.ppo_utils",
        "openrlhf.trainer.ppo_utils.samples_generator",  # builds every rollout sample
        "openrlhf.trainer.ppo_utils.experience_maker",
        "openrlhf.trainer.ray.ppo_actor",
        "openrlhf.trainer.ray.ppo_critic",
    )
    return (
        ("openrlhf.models.actor", "compute_entropy", compute_entropy),
        *((module, "Experience", SegmentExperience) for module in experience_users),
        ("openrlhf.trainer.ppo_trainer", "RemoteExperienceMaker", SegmentExperienceMaker),
        ("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer", SegmentActorPPOTrainer),
        ("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor", SapoPolicyModelActor),
        ("openrlhf.trainer.ray.ppo_critic", "CriticModelActor", SapoCriticModelActor),
        ("openrlhf.trainer.ray.ppo_critic", "CriticPPOTrainer", SegmentCriticPPOTrainer),
        ("openrlhf.trainer.ray.ppo_critic", "get_llm_for_sequence_regression", load_critic),
        ("openrlhf.cli.train_ppo_ray", "PolicyModelActor", SapoPolicyModelActor),
        ("openrlhf.cli.train_ppo_ray", "CriticModelActor", SapoCriticModelActor),
        ("openrlhf.trainer.ppo_trainer", "PPOTrainer", SapoPPOTrainer),  # train() imports it lazily
        ("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync", SapoPPOTrainerAsync),
        ("openrlhf.trainer.ppo_trainer_async", "TrainingActor", SapoTrainingActor),
        ("openrlhf.trainer.ppo_trainer_async", "GenerateSamplesActor", SapoGenerateSamplesActor),
        ("openrlhf.utils.deepspeed", "DeepspeedStrategy", SapoDeepspeedStrategy),  # get_strategy imports it lazily
    )


def apply_patches() -> None:
    """Make upstream build SAPO's classes in this process. Idempotent; safe for every estimator
    (SAPO's classes behave exactly as upstream's unless the estimator is sapo)."""
    global _applied
    if _applied:
        return
    prepare()
    for module, attribute, replacement in patch_table():
        rebind(module, attribute, replacement)
    _applied = True


@contextlib.contextmanager
def local_ray(store):
    """Within the block, upstream's LOCAL_RAY_MODULES call `store` where they call `ray`.

    Each module's source is checked first: a `ray.<name>` call outside LOCAL_RAY_CALLS (other
    than the import-time `ray.remote` decorator) would not work in one process, so it raises
    UpstreamMismatch instead of failing mid-run."""
    import re
    import types

    prepare()
    saved = {}
    facade = types.SimpleNamespace(**{name: getattr(store, name) for name in LOCAL_RAY_CALLS})
    try:
        for name in LOCAL_RAY_MODULES:
            module = importlib.import_module(name)
            calls = set(re.findall(r"\bray\.(\w+)\(", inspect.getsource(module))) - {"remote"}
            if not calls <= LOCAL_RAY_CALLS:
                raise UpstreamMismatch(
                    f"{name} calls ray.{sorted(calls - LOCAL_RAY_CALLS)} at run time; openrlhf_sapo's "
                    f"single-process backend only provides ray.{sorted(LOCAL_RAY_CALLS)} "
                    f"(openrlhf=={OPENRLHF_VERSION} changed?)"
                )
            saved[name] = module.ray
            module.ray = facade
        yield facade
    finally:
        for name, original in saved.items():
            importlib.import_module(name).ray = original


# The worker environment upstream's train() gives `ray.init` (openrlhf 0.11.2), for the CPU mode's
# own `ray.init`: (name, default), a value set in the driver's environment wins, as upstream does.
UPSTREAM_RAY_ENV_VARS = (
    ("TOKENIZERS_PARALLELISM", "true"),
    ("NCCL_DEBUG", "WARN"),
    ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
)


def install_for_training(args, ray_driver: bool = False) -> list:
    """Everything a driver needs before training: the patches and vLLM pipeline parallel. With
    `ray_driver` (the Ray CLI, before upstream's train(args)) on a machine without CUDA, also the CPU
    mode: changed options, CPU engines, Ray started or joined with every worker prepared for CPU.
    The single-process backend passes no `ray_driver` and starts no Ray. Returns what the CPU mode
    did, one line each."""
    import os

    cpu_ray = ray_driver and not cpu_compat.has_cuda()
    if ray_driver and not cpu_ray and getattr(args.vllm, "check_weight_sync", False):
        raise ValueError("--vllm.check_weight_sync is only implemented for CPU runs (vLLM on CPU with SAPO's gloo weight "
                         "sync); drop it on a GPU machine")
    apply_patches()
    from .trainer.ray.vllm_engine import apply_pipeline_parallel

    notes = []
    if cpu_ray:  # a GPU machine skips all of this: upstream's options and its own ray.init
        notes += cpu_compat.adapt_ray_args_for_cpu(args)  # idempotent: the CLI applied them before validation
    apply_pipeline_parallel(args, cpu=cpu_ray)
    if cpu_ray and args.vllm.num_engines and args.data.max_images_per_prompt > 0:
        from .trainer.ray.hf_rollout_actor import make_hf_rollout_actor_class

        rebind("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor", make_hf_rollout_actor_class())
        notes.append("rollout engines: Hugging Face generate in Ray actors (vLLM's VLMs need torchvision, which "
                     "has no build for this CPU torch)")
    if cpu_ray:
        env = {name: os.environ.get(name, default) for name, default in UPSTREAM_RAY_ENV_VARS}
        notes.append(cpu_compat.start_or_join_ray_on_cpu(args, env))
    return notes
