#!/usr/bin/env bash
# Join a worker node to the Ray cluster started by ray_start_head.sh (run it on every other node).
#
#   HEAD_IP=10.0.0.1 bash examples/scripts/multinode/ray_start_worker.sh
#   DRY_RUN=1 HEAD_IP=10.0.0.1 bash examples/scripts/multinode/ray_start_worker.sh
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra ray start flags]

Joins this node to a running Ray cluster (ray start --address HEAD_IP:RAY_PORT) with
GPUS_PER_NODE GPUs.

Environment variables (defaults in brackets):
  HEAD_IP         the head node's address (required)
  RAY_PORT        the head's GCS port [6379]
  GPUS_PER_NODE   [8]
  RAY_BLOCK       1: stay in the foreground (ray start --block), as under srun [0]
  DRY_RUN         1: print the command instead of running it [0]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

[[ -n "${HEAD_IP:-}" ]] || sapo_die "set HEAD_IP to the head node's address (see -h)"
RAY_PORT="${RAY_PORT:-6379}"

RAY_ARGS=(
    --address="${HEAD_IP}:${RAY_PORT}"
    --num-gpus="${GPUS_PER_NODE}"
)
sapo_ray_start "${RAY_BLOCK:-0}" "${RAY_ARGS[@]}" "$@"
