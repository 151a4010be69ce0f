#!/usr/bin/env bash
# Start the head node of a Ray cluster for multi-node training (run it on the head node, then
# ray_start_worker.sh on every other node, then submit_sapo.sh or sapo_70b_pp.sh).
#
#   HEAD_IP=10.0.0.1 bash examples/scripts/multinode/ray_start_head.sh
#   DRY_RUN=1 bash examples/scripts/multinode/ray_start_head.sh      # print the command only
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra ray start flags]

Starts the Ray head node (ray start --head) with GPUS_PER_NODE GPUs and the dashboard (the
address ray job submit talks to) on all interfaces.

Environment variables (defaults in brackets):
  HEAD_IP         this node's address as the other nodes reach it [first of hostname -I]
  RAY_PORT        GCS port the workers join [6379]
  DASHBOARD_PORT  dashboard / job-submission port [8265]
  GPUS_PER_NODE   [8]
  RAY_BLOCK       1: stay in the foreground (ray start --block), as under srun [0]
  DRY_RUN         1: print the command instead of running it [0]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

HEAD_IP="${HEAD_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
[[ -n "${HEAD_IP}" ]] || sapo_die "cannot find this node's address: set HEAD_IP"
RAY_PORT="${RAY_PORT:-6379}"
DASHBOARD_PORT="${DASHBOARD_PORT:-8265}"

RAY_ARGS=(
    --head
    --node-ip-address="${HEAD_IP}"
    --port="${RAY_PORT}"
    --num-gpus="${GPUS_PER_NODE}"
    --dashboard-host=0.0.0.0
    --dashboard-port="${DASHBOARD_PORT}"
)
sapo_ray_start "${RAY_BLOCK:-0}" "${RAY_ARGS[@]}" "$@"
if [[ "${DRY_RUN}" != 1 ]]; then
    echo "Ray head started: workers join with HEAD_IP=${HEAD_IP} RAY_PORT=${RAY_PORT} ray_start_worker.sh;" \
        "submit with RAY_ADDRESS=http://${HEAD_IP}:${DASHBOARD_PORT}"
fi
