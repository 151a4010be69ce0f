"""The seam to upstream OpenRLHF: the one module that imports it for the rest of the project.

It checks the installed openrlhf is the pinned release (our extensions are written against
its internals), prepares a CPU-only process (utils/cpu_compat.py) and lists every upstream
symbol the project uses, subclasses, wraps or rebinds, so an upstream change fails here with
a clear message instead of deep inside a training step.
"""

from __future__ import annotations

import importlib
import importlib.metadata

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


# (module, attribute, how we use it). Imported and checked by `upstream()`.
UPSTREAM_SYMBOLS = (
    ("openrlhf.models.loss", "PolicyLoss", "bench baseline; base of the segment-ratio actor loss"),
    ("openrlhf.models.loss", "ValueLoss", "bench baseline; base of the segment critic loss"),
    ("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker", "token GAE baseline (bench)"),
)


def upstream(module: str, attribute: str):
    """Import one listed upstream symbol after the version check and CPU preparation."""
    if (module, attribute) not in {(m, a) for m, a, _ in UPSTREAM_SYMBOLS}:
        raise KeyError(f"{module}.{attribute} is not listed in openrlhf_sapo.seam.UPSTREAM_SYMBOLS; add it there")
    check_openrlhf_version()
    cpu_compat.apply()
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise UpstreamMismatch(f"openrlhf=={OPENRLHF_VERSION} should provide {module}.{attribute}: {err}") from err
