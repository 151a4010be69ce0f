#!/usr/bin/env bash
# Runs the openrlhf_sapo GPU image (or the CPU image with --cpu) with the flags training needs.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: dockerfiles/docker_run.sh [options] [--] [command [args...]]

Runs the openrlhf_sapo GPU image with the usual flags (all GPUs, host IPC and network, unlimited
locked memory, a 64 MiB stack; a 16 GiB /dev/shm when IPC is private) as the calling user, with
data, checkpoints and the Hugging Face cache mounted. Without a command it runs the image's default
(GPU: bash; CPU: make demo).

Options:
  --cpu       run the CPU image instead (no GPUs): `make demo`, `make test`
  --dev       mount this checkout's openrlhf_sapo/, tests/ and examples/ into the image
              (the install is editable: the mounted code is what runs)
  --root      run as root instead of the calling user
  --dry-run   print the docker command instead of running it
  -h, --help  show this help

Environment (defaults in brackets):
  SAPO_IMAGE        GPU image                            [openrlhf-sapo:gpu]
  SAPO_CPU_IMAGE    CPU image                            [openrlhf-sapo:cpu]
  SAPO_DATA_DIR     host folder mounted at /data         [./data]
  SAPO_CKPT_DIR     host folder mounted at /checkpoints  [./checkpoints]
  SAPO_HF_CACHE     host Hugging Face cache, mounted at /cache/huggingface (HF_HOME)
                    [$HF_HOME, else ~/.cache/huggingface]
  SAPO_GPUS         value of --gpus                      [all]
  SAPO_IPC          IPC namespace                        [GPU: host; CPU: private]
  SAPO_SHM_SIZE     size of /dev/shm unless SAPO_IPC=host [16g]
  SAPO_NETWORK      network                              [host]
  SAPO_DOCKER_ARGS  extra docker run arguments, split on spaces
HF_TOKEN, WANDB_API_KEY and NCCL_*/GLOO_SOCKET_IFNAME, when set, are passed through.

Examples:
  dockerfiles/docker_run.sh                                    # a shell in the GPU image
  dockerfiles/docker_run.sh bash examples/scripts/<script>.sh  # a shipped script
  dockerfiles/docker_run.sh --cpu                              # the CPU demo
  dockerfiles/docker_run.sh --cpu make test                    # the test suite on CPU
EOF
}

mode=gpu
dev=0
as_root=0
dry_run=0
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --cpu) mode=cpu; shift ;;
    --dev) dev=1; shift ;;
    --root) as_root=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    -*) echo "docker_run.sh: unknown option $1 (see -h)" >&2; exit 2 ;;
    *) break ;;
  esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
workdir=/workspace/openrlhf_sapo
data_dir=${SAPO_DATA_DIR:-$PWD/data}
ckpt_dir=${SAPO_CKPT_DIR:-$PWD/checkpoints}
hf_cache=${SAPO_HF_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}}
if [ "$mode" = gpu ]; then
  ipc=${SAPO_IPC:-host}
else
  ipc=${SAPO_IPC:-private}
fi

args=(run --rm --init --ipc="$ipc" --network="${SAPO_NETWORK:-host}"
  --ulimit memlock=-1 --ulimit stack=67108864
  -v "$data_dir:/data" -v "$ckpt_dir:/checkpoints" -v "$hf_cache:/cache/huggingface"
  -e HF_HOME=/cache/huggingface -w "$workdir")
if [ "$ipc" != host ]; then
  # With the host's IPC namespace /dev/shm is the host's; otherwise Docker's 64 MiB default is far
  # too small for NCCL, vLLM, Ray's object store and DeepSpeed's shared-memory communication.
  args+=(--shm-size="${SAPO_SHM_SIZE:-16g}")
fi
if [ "$mode" = gpu ]; then
  image=${SAPO_IMAGE:-openrlhf-sapo:gpu}
  args+=(--gpus "${SAPO_GPUS:-all}")
else
  image=${SAPO_CPU_IMAGE:-openrlhf-sapo:cpu}
fi
if [ "$as_root" = 0 ]; then
  args+=(--user "$(id -u):$(id -g)")
fi
if [ "$dev" = 1 ]; then
  # The sources only: the image keeps its own environment (the CPU image's .venv lives in $workdir).
  for dir in openrlhf_sapo tests examples; do
    args+=(-v "$repo/$dir:$workdir/$dir")
  done
fi
if [ -t 0 ] && [ -t 1 ]; then
  args+=(-it)
fi
for var in HF_TOKEN WANDB_API_KEY NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_DEBUG GLOO_SOCKET_IFNAME; do
  if [ -n "${!var:-}" ]; then
    args+=(-e "$var")
  fi
done
if [ -n "${SAPO_DOCKER_ARGS:-}" ]; then
  read -r -a extra <<<"$SAPO_DOCKER_ARGS"
  args+=("${extra[@]}")
fi
args+=("$image" "$@")

if [ "$dry_run" = 1 ]; then
  printf '%q ' docker "${args[@]}"
  printf '\n'
  exit 0
fi
# Create the mounted folders as the caller, not as root through the Docker daemon.
mkdir -p "$data_dir" "$ckpt_dir" "$hf_cache"
exec docker "${args[@]}"
