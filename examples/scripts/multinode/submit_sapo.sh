#!/usr/bin/env bash
# Submit SAPO training to a running multi-node Ray cluster (ray_start_head.sh / ray_start_worker.sh,
# or slurm_sapo.sbatch) with `ray job submit`, shipping this checkout as the job's working
# directory (runtime env working_dir; .venv, .git, runs/ and data/ are left out).
#
# It runs a training script of this folder tree with SAPO_LAUNCHER=ray-job: by default
# geo3k/sapo.sh (Table 7's SAPO recipe) on NNODES x GPUS_PER_NODE GPUs; SCRIPT picks another
# (text/sapo.sh, geo3k/ppo.sh, ...), whose own variables (MODEL_SIZE, MODEL, DATASET, ...) apply.
#
#   RAY_ADDRESS=http://10.0.0.1:8265 NNODES=2 bash examples/scripts/multinode/submit_sapo.sh
#   DRY_RUN=1 bash examples/scripts/multinode/submit_sapo.sh    # runs the python command here with
#                                                                # --dry-run; submits nothing
#
# Paths in the job: the job runs in the unpacked working directory on the head node, and Ray
# workers start there too, so the reward function is given relative to it. DATA_DIR, SAVE_ROOT
# and LOG_ROOT must be absolute paths on storage every node shares.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

Submits a training script (default geo3k/sapo.sh) to a Ray cluster with ray job submit.

Environment variables (defaults in brackets):
  RAY_ADDRESS      the cluster's dashboard address [http://127.0.0.1:8265]
  SCRIPT           training script, relative to examples/scripts [geo3k/sapo.sh]
  NNODES           nodes of the cluster [2]
  GPUS_PER_NODE    [8]
  REWARD_FUNC      [openrlhf_sapo/rewards/math_reward.py, relative to the job's working dir]
  RAY_JOB_NO_WAIT  1: return after submitting (ray job submit --no-wait) [wait and stream logs]
The variables of SCRIPT apply as well (e.g. MODEL_SIZE 3b|7b for geo3k/sapo.sh)."

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export NNODES="${NNODES:-2}"
export REWARD_FUNC="${REWARD_FUNC:-openrlhf_sapo/rewards/math_reward.py}"
# shellcheck source=examples/scripts/common.sh
source "${HERE}/../common.sh"
sapo_help "$@"

SCRIPT="${SCRIPT:-geo3k/sapo.sh}"
[[ -f "${HERE}/../${SCRIPT}" ]] || sapo_die "SCRIPT=${SCRIPT}: no such script under examples/scripts"
export SAPO_LAUNCHER=ray-job
exec bash "${HERE}/../${SCRIPT}" "$@"
