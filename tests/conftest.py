"""Shared test set-up.

The openrlhf wheel installs a top-level `tests` package into site-packages. pytest puts this
repository first on sys.path, so `tests` here is ours; fail loudly if that ever changes
rather than running upstream's tests or importing their helpers.
"""

import os

import tests as _this_package

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(_this_package.__file__)) != os.path.join(_REPO, "tests"):
    raise RuntimeError(
        f"`tests` resolved to {_this_package.__file__}, not this repository's tests/ "
        "(openrlhf's wheel ships a top-level `tests` package): run pytest from the repository root"
    )
