"""Pinned CPU numerics, so that a seeded demo gives the same numbers on every x86-64 machine.

The tiny models' training is chaotic: one flipped low bit early on ends as a different warm start
and different accuracies 800 steps later. Measured on a 30-step warm start, each of these alone
changes the weights: the thread count (1 vs 2), PyTorch's vectorized kernels (AVX2 vs the scalar
build; an AVX-512 CPU takes a third path, even for the random initialisation) and MKL's matmul code
path. The demo therefore fixes all three before torch runs a kernel, whatever the machine has:
  ATEN_CPU_CAPABILITY=avx2       PyTorch's vectorized kernels (read at the first kernel call);
  MKL_CBWR=AVX2                  MKL's conditional numerical reproducibility branch (matmuls);
  ONEDNN_MAX_CPU_ISA=AVX2        oneDNN (convolutions, bf16 matmuls on AVX-512 CPUs);
  torch.backends.mkldnn off      bf16 matmuls take ATen's kernel on every CPU, not oneDNN's on
                                 AVX-512-BF16 CPUs only;
  2 threads                      (torch intra-op, OpenMP, MKL) the cores of this project's machines.
A CPU without AVX2 runs the same settings except the first two, and then differs from them.
"""

from __future__ import annotations

import os
from typing import Dict

DEMO_THREADS = 2


def cpu_has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return "avx2" in flags and "fma" in flags
    except OSError:
        pass
    return False


def pinned_environment(avx2: bool) -> Dict[str, str]:
    env = {"OMP_NUM_THREADS": str(DEMO_THREADS), "MKL_NUM_THREADS": str(DEMO_THREADS)}
    if avx2:
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    return env


def pin_cpu_numerics() -> Dict[str, str]:
    """Fix the settings above in this process (and the processes it starts); returns what it set.
    Must run before torch executes its first kernel; an already-used torch is refused loudly
    rather than left to give machine-dependent numbers."""
    env = pinned_environment(cpu_has_avx2())
    os.environ.update(env)
    import torch

    torch.set_num_threads(DEMO_THREADS)
    torch.backends.mkldnn.enabled = False
    want = env.get("ATEN_CPU_CAPABILITY")
    got = torch.backends.cpu.get_cpu_capability()
    if want and got.lower() != want:
        raise RuntimeError(f"torch already chose its {got} kernels before the demo pinned {want}: "
                           "call pin_cpu_numerics() before running any torch operation")
    env["torch.backends.mkldnn.enabled"] = "False"
    env["torch kernels"] = got
    return env
