"""Upstream OpenRLHF as this project sees it: the bottom of the package's import graph.

- `check_openrlhf_version()` / `prepare()`: the installed openrlhf is the pinned release (our
  extensions are written against its internals), and a CPU-only process is prepared for it
  (utils/cpu_compat.py) before anything of upstream is imported.
- `UPSTREAM_SYMBOLS` lists every upstream symbol the project uses, subclasses, wraps or rebinds;
  `upstream(module, attribute)` imports one of them (upstream's own object, also after patching).
- `@replaces(module, attribute, ...)` records a SAPO replacement of an upstream object in one
  registry (`REPLACEMENTS`): where to rebind it, and where upstream's original deliberately stays.
  Nothing is rebound here: `openrlhf_sapo/patches.py`, the top of the graph, imports every
  replacement, applies the registry and checks no upstream module still binds an original.
- `sapo_remote_class(...)`: a Ray remote subclass of an upstream remote class whose worker applies
  the patches before upstream's constructor runs.
- `local_ray(store)`: upstream's Ray calls answered in one process (the single-process backend).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

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


def prepare() -> None:
    check_openrlhf_version()
    cpu_compat.apply()


# (module, attribute, how we use it). Every upstream symbol the project touches.
UPSTREAM_SYMBOLS = (
    ("openrlhf.models.loss", "PolicyLoss", "subclassed: SegmentPolicyLoss (segment ratio); bench baseline"),
    ("openrlhf.models.loss", "ValueLoss", "bench baseline; the critic keeps it, on a boundary mask"),
    ("openrlhf.models.loss", "aggregate_loss", "the soft adaptive baseline aggregates its loss as upstream's"),
    ("openrlhf.models.utils", "masked_mean", "the soft adaptive baseline's logged statistics"),
    ("openrlhf.trainer.ppo_utils.experience", "Experience", "subclassed: SegmentExperience; rebound"),
    ("openrlhf.trainer.ppo_utils.experience", "tensor_field", "declares SegmentExperience's fields"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker", "subclassed: SegmentExperienceMaker"),
    ("openrlhf.trainer.ppo_utils.length_penalty", "apply_length_penalties", "SAPO's reward shaping, as upstream's"),
    ("openrlhf.models.utils", "compute_reward", "SAPO's KL-shaped per-token rewards, as upstream's"),
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
    ("openrlhf.utils.utils", "is_vlm_model", "which HF class loads a checkpoint; VLM detection everywhere"),
)

# Upstream code the project runs from the installed source files rather than by import
# (openrlhf_sapo/cli/upstream_main.py checks the structure it expects and fails clearly).
UPSTREAM_SOURCE_READS = (
    ("openrlhf.cli.train_ppo_ray", "__main__ block: the argparse parser and the argument validation"),
    ("openrlhf.utils.config", "hierarchize, loaded alone (openrlhf.utils' __init__ imports DeepSpeed)"),
)

# The worker environment upstream's train() gives `ray.init` (openrlhf 0.11.2), for the CPU mode's
# own `ray.init`: (name, default), a value set in the driver's environment wins, as upstream does.
UPSTREAM_RAY_ENV_VARS = (
    ("TOKENIZERS_PARALLELISM", "true"),
    ("NCCL_DEBUG", "WARN"),
    ("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1"),
)


# ---------------------------------------------------------------- the replacement registry


@dataclass(frozen=True)
class Replacement:
    """SAPO's `replacement` for upstream's `original`, bound as `attribute` in every module of `rebind_in`;
    `kept_in` names the upstream modules that deliberately keep the original, and why."""

    attribute: str
    original: object
    replacement: object
    rebind_in: Tuple[str, ...]
    kept_in: Dict[str, str] = field(default_factory=dict)


REPLACEMENTS: List[Replacement] = []
_ORIGINAL_OF: Dict[object, object] = {}  # replacement -> upstream's object (objects as keys, not ids)


def replaces(module: str, attribute: str, also_in: Tuple[str, ...] = (), kept_in: Dict[str, str] = None,
             rebind_in: Tuple[str, ...] = None):
    """Decorator: the decorated object replaces upstream's `module.attribute` (a listed symbol), rebound
    there and in `also_in` when patches.py applies the registry (or only in `rebind_in`, when given: the
    defining module then belongs in `kept_in`). Returns the object unchanged."""

    def register(replacement):
        original = upstream(module, attribute)
        if replacement in _ORIGINAL_OF:
            raise ValueError(f"{replacement!r} is registered twice as a replacement")
        _ORIGINAL_OF[replacement] = original
        where = tuple(rebind_in) if rebind_in is not None else (module, *also_in)
        REPLACEMENTS.append(Replacement(attribute, original, replacement, where, dict(kept_in or {})))
        return replacement

    return register


def conditional_replacement(replacement, original):
    """Record a replacement that the code deciding on it rebinds itself, with `rebind` (vLLM pipeline
    parallel, the CPU mode's HF rollout actor): `upstream()` and `original_of` still see upstream's."""
    _ORIGINAL_OF.setdefault(replacement, original)
    return replacement


def original_of(obj):
    """The upstream object behind obj (obj itself unless it is a registered replacement)."""
    try:
        return _ORIGINAL_OF.get(obj, obj)
    except TypeError:  # unhashable: never a replacement
        return obj


def upstream(module: str, attribute: str):
    """Import one listed upstream symbol after the version check and CPU preparation."""
    if (module, attribute) not in {(m, a) for m, a, _ in UPSTREAM_SYMBOLS}:
        raise KeyError(f"{module}.{attribute} is not listed in openrlhf_sapo.upstream.UPSTREAM_SYMBOLS; add it there")
    prepare()
    try:
        return original_of(getattr(importlib.import_module(module), attribute))
    except (ImportError, AttributeError) as err:
        raise UpstreamMismatch(f"openrlhf=={OPENRLHF_VERSION} should provide {module}.{attribute}: {err}") from err


def rebind(module: str, attribute: str, replacement, original) -> None:
    """Point `module.attribute` at `replacement`, checking it held upstream's `original` (or already it)."""
    mod = importlib.import_module(module)
    current = getattr(mod, attribute, None)
    if current is replacement:
        return
    if original_of(current) is not original:
        raise UpstreamMismatch(
            f"{module}.{attribute} is {current!r}, not the upstream object openrlhf_sapo replaces "
            f"({original!r}); openrlhf=={OPENRLHF_VERSION} changed or another patch ran first"
        )
    setattr(mod, attribute, replacement)


# ---------------------------------------------------------------- Ray workers

PATCHES_MODULE = "openrlhf_sapo.patches"  # imported by name in workers: it sits above every module here


def sapo_remote_class(remote_cls, mixin=None, before_init=None):
    """A Ray remote subclass of an upstream remote class that applies the patches in its worker.

    Ray pickles remote classes by value with the module globals they reference as the driver had
    them, while plain classes are imported afresh in each worker: applying the patches at the start
    of every worker SAPO creates covers both. `mixin` adds or overrides methods (it precedes the
    upstream class in the MRO); `before_init(args, kwargs)` runs after the patches, before
    upstream's constructor. The Ray options (e.g. num_gpus=1) are upstream's.
    """
    import ray

    base = remote_cls.__ray_actor_class__

    def prepare_worker(args, kwargs):
        importlib.import_module(PATCHES_MODULE).apply_patches()
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
    module = mixin.__module__ if mixin is not None else __name__
    cls = type(f"Sapo{base.__name__}", bases, {"__init__": __init__, "__module__": module})
    return ray.remote(**remote_cls._default_options)(cls) if remote_cls._default_options else ray.remote(cls)


# ---------------------------------------------------------------- one process, no Ray

# Upstream modules that call the `ray` module at run time and that the single-process backend
# runs in one process; `local_ray()` swaps their `ray` for an in-process object store offering
# exactly these calls (checked against their source).
LOCAL_RAY_MODULES = (
    "openrlhf.trainer.ppo_trainer",
    "openrlhf.trainer.ppo_utils.experience_maker",
    "openrlhf.trainer.ppo_utils.samples_generator",
)
LOCAL_RAY_CALLS = frozenset({"get", "put", "wait"})


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
