"""OpenRLHF reward function for math answers (Geo3K, GSM8K, MATH): accuracy of the last ``\\boxed{}``
plus the release's format term.

Use::

    --reward.remote_url openrlhf_sapo/rewards/math_reward.py

OpenRLHF 0.11.2 (``utils/agent.py``, ``SingleTurnAgentExecutor``) loads this file by path inside every vLLM
actor (module name "reward_func", not registered in ``sys.modules``) and calls
``reward_func(queries, prompts, labels)`` through ``asyncio.to_thread`` with lists of length 1, where a
query is the decoded prompt + response with special tokens (for VLMs with the image pads expanded).
It returns, for B queries::

    {"rewards": float32 tensor (B,),      # (1 - w) * accuracy + w * format, the training reward
     "scores": float32 tensor (B,),       # accuracy (0/1): what --algo.dynamic_filtering averages per group
     "extra_logs": {"accuracy": (B,), "format": (B,), "has_answer": (B,), "verifier_timeout": (B,)}}

Upstream turns each extra_logs value into ``Experience.info[name]`` (first element only), so they are
logged as ``train/accuracy`` etc. next to ``train/reward`` (the shaped reward) and ``train/score``.

Upstream passes no options, so configuration is by environment variable (read once, at load; an invalid
value raises at load with the variable's name):

- ``SAPO_REWARD_FORMAT_WEIGHT`` (default 0.1): w above; the release uses 0.1 (0.9 / 0.1); 0 = pure accuracy.
- ``SAPO_REWARD_TIMEOUT`` (default 5.0): seconds of verifier time per answer, then accuracy 0.
- ``SAPO_REWARD_ANSWER_TYPE`` (default auto): auto | choice | number | expression (see ``grading.is_equivalent``).
- ``SAPO_REWARD_WORKERS`` (default 2): helper processes per loading process (each about 60 MB).
- ``SAPO_REWARD_WORKER_MEMORY_MB`` (default 4096): address-space cap per helper process; 0 = none.
- ``SAPO_REWARD_PRESTART`` (default 1): start the helper processes when the file is loaded and wait (about
  1 s) until one is ready, so a helper that cannot start fails the load with a RuntimeError instead of
  scoring every sample 0 ("verifier unavailable") later.

Never raises: any problem (a label that is None/bytes/a list, a query that is not a string, mismatched
list lengths, an internal error) gives that sample reward 0, and each kind of reason is logged once per
process (python logging, logger "openrlhf_sapo.rewards"). Upstream would otherwise swallow the exception,
set the reward to None and fail later with "reward_model_group is required".

Works both as ``import openrlhf_sapo.rewards.math_reward`` and loaded by path (the sibling ``grading.py``
is then used, imported as the package module when that is the same file; else this file's folder is
imported as the package ``_openrlhf_sapo_rewards``, so that ``grading`` finds its sibling modules and the
helper processes import the same files).
"""

import importlib
import logging
import os
import sys
import types

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
_GRADING_PATH = os.path.join(_HERE, "grading.py")
_BY_PATH_PACKAGE = "_openrlhf_sapo_rewards"

logger = logging.getLogger("openrlhf_sapo.rewards")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _load_grading():
    try:
        from openrlhf_sapo.rewards import grading

        if _same_file(grading.__file__, _GRADING_PATH):
            return grading
    except ImportError:
        pass
    # Loaded by path from a checkout that is not the importable package: import this folder as a package
    # of its own (grading imports its siblings relatively), replacing one registered from another folder.
    package = sys.modules.get(_BY_PATH_PACKAGE)
    if package is None or not _same_file(package.__path__[0], _HERE):
        for name in [n for n in sys.modules if n == _BY_PATH_PACKAGE or n.startswith(_BY_PATH_PACKAGE + ".")]:
            del sys.modules[name]
        package = types.ModuleType(_BY_PATH_PACKAGE)
        package.__path__ = [_HERE]
        sys.modules[_BY_PATH_PACKAGE] = package
    return importlib.import_module(_BY_PATH_PACKAGE + ".grading")


grading = _load_grading()


def _env_float(name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not (low < value <= high if low_open else low <= value <= high):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name}={raw!r} must be in {bound}")
    return value


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < low:
        raise ValueError(f"{name}={raw!r} must be >= {low}")
    return value


def read_config() -> dict:
    """The settings from the environment (see the module docstring); raises ValueError on a bad value."""
    answer_type = os.environ.get("SAPO_REWARD_ANSWER_TYPE", "").strip() or "auto"
    if answer_type not in grading.ANSWER_TYPES:
        raise ValueError(f"SAPO_REWARD_ANSWER_TYPE={answer_type!r} must be one of {grading.ANSWER_TYPES}")
    prestart = os.environ.get("SAPO_REWARD_PRESTART", "1").strip().lower()
    if prestart not in ("0", "1", "true", "false", "yes", "no", ""):
        raise ValueError(f"SAPO_REWARD_PRESTART={prestart!r} must be 0 or 1")
    return {
        "format_weight": _env_float("SAPO_REWARD_FORMAT_WEIGHT", grading.DEFAULT_FORMAT_WEIGHT, 0.0, 1.0),
        "timeout_s": _env_float("SAPO_REWARD_TIMEOUT", grading.DEFAULT_TIMEOUT_S, 0.0, 3600.0, low_open=True),
        "answer_type": answer_type,
        "workers": _env_int("SAPO_REWARD_WORKERS", 2, 1),
        "memory_mb": _env_int("SAPO_REWARD_WORKER_MEMORY_MB", 4096, 0),
        "prestart": prestart in ("1", "true", "yes", ""),
    }


CONFIG = read_config()
grading.configure_verifier(workers=CONFIG["workers"], memory_mb=CONFIG["memory_mb"], prestart=CONFIG["prestart"])
if CONFIG["prestart"]:
    grading.check_verifier()  # fail at load, loudly, rather than score every sample 0 later

_LOG_KEYS = ("accuracy", "format", "has_answer", "verifier_timeout")


def _as_list(values, n: int, what: str, logged: set):
    if isinstance(values, (list, tuple)) and len(values) == n:
        return list(values)
    kind = f"{what} is not a list as long as the batch"
    if kind not in logged:
        logged.add(kind)
        got = type(values).__name__
        if isinstance(values, (list, tuple)):
            got += f" of length {len(values)}"
        logger.warning("math reward: %s (%d; got %s); affected samples get reward 0 (logged once)", kind, n, got)
    return None


_LOGGED = set()


def _zeros(n: int) -> dict:
    zero = torch.zeros(n, dtype=torch.float32)
    return {"rewards": zero, "scores": zero.clone(), "extra_logs": {k: zero.clone() for k in _LOG_KEYS}}


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    """OpenRLHF's ``reward_func(queries, prompts, labels)``; see the module docstring."""
    n = len(queries) if isinstance(queries, (list, tuple)) else 1
    try:
        query_list = _as_list(queries, n, "queries", _LOGGED)
        if query_list is None:
            return _zeros(n)
        label_list = _as_list(labels, n, "labels", _LOGGED) or [None] * n
        prompt_list = prompts if isinstance(prompts, (list, tuple)) and len(prompts) == n else [None] * n
        responses = [
            grading.response_from_query(q, p if isinstance(p, str) else None) if isinstance(q, str) else q
            for q, p in zip(query_list, prompt_list)
        ]
        results = grading.score_responses(
            responses,
            label_list,
            answer_type=CONFIG["answer_type"],
            format_weight=CONFIG["format_weight"],
            timeout_s=CONFIG["timeout_s"],
        )
        if len(results) != n:  # only on a bad argument, which read_config rules out
            return _zeros(n)
        rewards = torch.tensor([r["reward"] for r in results], dtype=torch.float32)
        accuracy = torch.tensor([r["accuracy"] for r in results], dtype=torch.float32)
        return {
            "rewards": rewards,
            "scores": accuracy.clone(),
            "extra_logs": {
                "accuracy": accuracy,
                "format": torch.tensor([r["format"] for r in results], dtype=torch.float32),
                "has_answer": torch.tensor([1.0 if r.get("answer") else 0.0 for r in results], dtype=torch.float32),
                "verifier_timeout": torch.tensor(
                    [1.0 if r["reason"].startswith("timeout") else 0.0 for r in results], dtype=torch.float32
                ),
            },
        }
    except Exception as e:  # noqa: BLE001 - upstream would turn an exception into a crash much later
        kind = f"internal error: {type(e).__name__}"
        if kind not in _LOGGED:
            _LOGGED.add(kind)
            logger.exception("math reward: %s; the batch gets reward 0", kind)
        return _zeros(n)
