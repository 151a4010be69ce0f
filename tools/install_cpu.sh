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

# 1. torch first: flash-attn builds against it (no build isolation), and the pinned CPU wheel
#    must win over the CUDA build any other resolver path would pull.
"${pip[@]}" "torch==2.13.0" $(grep -E '^(setuptools|wheel|packaging|psutil|ninja|numpy)==' "$LOCK")

# 2. The locked set. flash-attn 2.8.3 is built as pure Python (its kernels need CUDA);
#    utils/cpu_compat.py supplies the missing kernel module at import time.
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  "${pip[@]}" --no-deps --no-build-isolation -r "$LOCK"

# 3. This package.
"${pip[@]}" --no-deps --no-build-isolation -e .

# The environment must import what the project uses.
"$VENV/bin/python" - <<'PY'
from openrlhf_sapo.seam import check_openrlhf_version
import torch, vllm, deepspeed, ray, transformers
assert not torch.version.cuda, f"expected the CPU torch wheel, got CUDA {torch.version.cuda}"
print(f"[install] openrlhf {check_openrlhf_version()}, torch {torch.__version__}, vllm {vllm.__version__}, "
      f"deepspeed {deepspeed.__version__}, ray {ray.__version__}, transformers {transformers.__version__}")
PY
echo "$want" > "$STAMP"
