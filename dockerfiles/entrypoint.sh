#!/usr/bin/env bash
# Entrypoint of the openrlhf_sapo images (GPU and CPU). Runs the command as whoever the container
# runs as: root, or any `docker run --user "$(id -u):$(id -g)"`, with or without a passwd entry.
# Such a user gets HOME=/ from Docker (not writable) and no user name; torch, Triton, vLLM, DeepSpeed
# and the Hugging Face hub all write caches under HOME, and torch's getpass.getuser() needs a name.
set -euo pipefail

uid=$(id -u)

if [ -z "${HOME:-}" ] || [ "$HOME" = "/" ] || ! { mkdir -p "$HOME" 2>/dev/null && [ -w "$HOME" ]; }; then
  export HOME="/tmp/home-$uid"
  mkdir -p "$HOME"
fi

if ! id -un >/dev/null 2>&1; then
  export USER="${USER:-user$uid}"
  export LOGNAME="${LOGNAME:-$USER}"
fi

# Caches default under HOME; a value passed with -e (a mounted cache) wins.
export XDG_CACHE_HOME="${XDG_CACHE_HOME:-$HOME/.cache}"
export HF_HOME="${HF_HOME:-$XDG_CACHE_HOME/huggingface}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$XDG_CACHE_HOME/triton}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$XDG_CACHE_HOME/torch_extensions}"
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$XDG_CACHE_HOME/vllm}"
export PATH="$HOME/.local/bin:$PATH"

for dir in "$XDG_CACHE_HOME" "$HF_HOME" "$TRITON_CACHE_DIR" "$TORCH_EXTENSIONS_DIR" "$VLLM_CACHE_ROOT"; do
  mkdir -p "$dir" 2>/dev/null || echo "entrypoint: cannot create $dir (uid $uid); set it to a writable path" >&2
done

if [ "$#" -eq 0 ]; then
  set -- bash
fi
exec "$@"
