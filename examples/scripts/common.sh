# shellcheck shell=bash
# Helpers sourced by every script under examples/scripts/ (this file is not run on its own).
#
# A launch script sets USAGE (its own text), sources this file and then:
#   sapo_help "$@"                       # -h/--help anywhere: print USAGE + the shared variables, exit 0
#   sapo_cluster_args critic|no_critic   # fills CLUSTER_ARGS (GPUs, colocation, vLLM engines)
#   sapo_output_args "$RUN_NAME"         # fills OUTPUT_ARGS (checkpoints, tensorboard, wandb)
#   sapo_launch "${ARGS[@]}" "$@"        # python3 -m openrlhf_sapo.cli.train_ppo_ray ... (+ --dry-run)
#   sapo_submit_ray_job "${ARGS[@]}" "$@"  # the same through `ray job submit` (or a local --dry-run)
#   sapo_run_or_print CMD...             # run CMD with `set -x`, or with DRY_RUN=1 only print it
#   sapo_ray_start BLOCK ARGS...         # ray start ARGS (+ --block when BLOCK is 1), or print it
# The Table 7 flag blocks the training scripts share are in geo3k/recipe.sh (and text/recipe.sh).
# Extra command-line arguments ("$@") are appended after the script's flags: argparse keeps the
# last value of a flag, so they override the script (e.g. `sapo.sh --train.num_episodes 1`).

SAPO_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SAPO_TRAIN_MODULE="openrlhf_sapo.cli.train_ppo_ray"

# The package is importable from a checkout without `pip install -e .` (the driver and, for a
# Ray cluster started by the driver, its workers inherit PYTHONPATH).
export PYTHONPATH="${SAPO_REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"

# ---------------------------------------------------------------- shared environment defaults
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"
DATA_DIR="${DATA_DIR:-${SAPO_REPO_ROOT}/data}"
SAVE_ROOT="${SAVE_ROOT:-${SAPO_REPO_ROOT}/runs/checkpoints}"
LOG_ROOT="${LOG_ROOT:-${SAPO_REPO_ROOT}/runs/logs}"
REWARD_FUNC="${REWARD_FUNC:-${SAPO_REPO_ROOT}/openrlhf_sapo/rewards/math_reward.py}"
NNODES="${NNODES:-1}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
VLLM_TP="${VLLM_TP:-1}"
VLLM_PP="${VLLM_PP:-1}"
VLLM_GPU_UTIL="${VLLM_GPU_UTIL:-0.5}"
MICRO_TRAIN_BATCH="${MICRO_TRAIN_BATCH:-2}"
MICRO_ROLLOUT_BATCH="${MICRO_ROLLOUT_BATCH:-4}"
EVAL_STEPS="${EVAL_STEPS:-10}"
SAVE_STEPS="${SAVE_STEPS:-50}"
SEED="${SEED:-42}"
WANDB_PROJECT="${WANDB_PROJECT:-sapo}"

SAPO_COMMON_USAGE="Shared environment variables (defaults in brackets):
  DRY_RUN        1: append --dry-run (validate every flag, print the resolved config as JSON, start
                 nothing; no GPU needed); ray job / Slurm scripts then run the python command locally [0]
  PYTHON         python executable [python3]
  DATA_DIR       prepared data (examples/scripts/data/prepare_data.sh) [<repo>/data]
  SAVE_ROOT      checkpoints go to SAVE_ROOT/RUN_NAME [<repo>/runs/checkpoints]
  LOG_ROOT       tensorboard logs go to LOG_ROOT/RUN_NAME [<repo>/runs/logs]
  RUN_NAME       name of the run (save / log folder, wandb run) [per script]
  REWARD_FUNC    reward function file for --reward.remote_url [openrlhf_sapo/rewards/math_reward.py]
  NNODES         nodes [1]              GPUS_PER_NODE  GPUs per node [8]
  VLLM_TP        vLLM tensor parallel size per engine [1]
  VLLM_PP        vLLM pipeline parallel size per engine [1]
  VLLM_GPU_UTIL  vLLM gpu_memory_utilization [0.5]
  MICRO_TRAIN_BATCH / MICRO_ROLLOUT_BATCH  per-GPU micro batches [2 / 4]
  EVAL_STEPS     evaluate every N steps (-1: never) [10]
  SAVE_STEPS     checkpoint every N steps (-1: never) [50]
  SEED           [42]
  WANDB_API_KEY  if set, log to wandb (project WANDB_PROJECT [sapo]); the key is masked in the trace
  SAPO_LAUNCHER  local (run here) | ray-job (ray job submit to RAY_ADDRESS) [local]
  RAY_ADDRESS    Ray dashboard address for ray-job [http://127.0.0.1:8265]
  RAY_JOB_NO_WAIT  1: ray-job returns after submitting (ray job submit --no-wait) [0]
Extra arguments are appended to the training flags and override them (the last value of a flag wins)."

# ---------------------------------------------------------------- helpers

# Print USAGE and the shared variables and exit 0 if -h/--help is among the arguments.
sapo_help() {
    local arg
    for arg in "$@"; do
        if [[ "${arg}" == "-h" || "${arg}" == "--help" ]]; then
            printf '%s\n\n%s\n' "${USAGE:-}" "${SAPO_COMMON_USAGE}"
            exit 0
        fi
    done
}

sapo_die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

# sapo_choice NAME VALUE ALLOWED...: exit 2 unless VALUE is one of ALLOWED.
sapo_choice() {
    local name="$1" value="$2" allowed
    shift 2
    for allowed in "$@"; do
        [[ "${value}" == "${allowed}" ]] && return 0
    done
    sapo_die "${name}=${value} is not one of: $*"
}

# sapo_episodes STEPS PROMPTS ROLLOUT_BATCH: the --train.num_episodes that makes STEPS rollout
# steps when each episode reads PROMPTS prompts (--data.max_samples) in batches of ROLLOUT_BATCH.
# OpenRLHF 0.11.2 has no "total steps" flag: a step is one rollout batch, an episode one pass
# over the (first --data.max_samples) prompts.
sapo_episodes() {
    local steps="$1" prompts="$2" batch="$3"
    (( prompts % batch == 0 )) || sapo_die "PROMPTS=${prompts} is not a multiple of the rollout batch ${batch}"
    local per_episode=$(( prompts / batch ))
    (( steps % per_episode == 0 )) || sapo_die "STEPS=${steps} is not a multiple of ${per_episode} steps per episode"
    echo $(( steps / per_episode ))
}

# sapo_cluster_args critic|no_critic: every model and the vLLM engines share the same
# NNODES x GPUS_PER_NODE GPUs (OpenRLHF's hybrid engine: --train.colocate_all, sleep modes).
sapo_cluster_args() {
    local with_critic="$1"
    local gpus=$(( NNODES * GPUS_PER_NODE ))
    local per_engine=$(( VLLM_TP * VLLM_PP ))
    (( gpus % per_engine == 0 )) ||
        sapo_die "NNODES*GPUS_PER_NODE=${gpus} is not a multiple of VLLM_TP*VLLM_PP=${per_engine}"
    # shellcheck disable=SC2034  # used by the sourcing script
    CLUSTER_ARGS=(
        --actor.num_nodes "${NNODES}"
        --actor.num_gpus_per_node "${GPUS_PER_NODE}"
        --ref.num_nodes "${NNODES}"
        --ref.num_gpus_per_node "${GPUS_PER_NODE}"
        --vllm.num_engines $(( gpus / per_engine ))
        --vllm.tensor_parallel_size "${VLLM_TP}"
        --vllm.pipeline_parallel_size "${VLLM_PP}"
        --vllm.gpu_memory_utilization "${VLLM_GPU_UTIL}"
        --vllm.sync_backend nccl
        --vllm.enforce_eager
        --vllm.enable_sleep
        --ds.enable_sleep
        --train.colocate_all
    )
    if [[ "${with_critic}" == critic ]]; then
        CLUSTER_ARGS+=(
            --critic.num_nodes "${NNODES}"
            --critic.num_gpus_per_node "${GPUS_PER_NODE}"
        )
    fi
}

# sapo_output_args RUN_NAME: checkpoints, logs and (with WANDB_API_KEY) wandb.
sapo_output_args() {
    local run_name="$1"
    # shellcheck disable=SC2034  # used by the sourcing script
    OUTPUT_ARGS=(
        --ckpt.output_dir "${SAVE_ROOT}/${run_name}"
        --ckpt.path "${SAVE_ROOT}/${run_name}/ckpt"
        --ckpt.save_hf
        --ckpt.save_steps "${SAVE_STEPS}"
        --ckpt.max_num 2
        --logger.logging_steps 1
        --logger.tensorboard_dir "${LOG_ROOT}/${run_name}"
    )
    if [[ -n "${WANDB_API_KEY:-}" ]]; then
        OUTPUT_ARGS+=(
            --logger.wandb.key "${WANDB_API_KEY}"
            --logger.wandb.project "${WANDB_PROJECT}"
            --logger.wandb.run_name "${run_name}"
        )
    fi
}

# The arguments as one shell-quoted line, the value after --logger.wandb.key masked.
sapo_quoted() {
    local arg prev="" masked=()
    for arg in "$@"; do
        if [[ "${prev}" == --logger.wandb.key ]]; then masked+=(MASKED_WANDB_API_KEY); else masked+=("${arg}"); fi
        prev="${arg}"
    done
    local quoted
    printf -v quoted '%q ' "${masked[@]}"
    printf '%s\n' "${quoted% }"
}

# Run a command with `set -x` around it, as OpenRLHF's scripts do. `set -x` would print the
# wandb key, so with --logger.wandb.key the trace is printed here instead, key masked.
sapo_run() {
    local arg
    for arg in "$@"; do
        if [[ "${arg}" == --logger.wandb.key ]]; then
            printf '+ %s\n' "$(sapo_quoted "$@")" >&2
            "$@"
            return
        fi
    done
    set -x
    "$@"
    { local rc=$?; set +x; } 2>/dev/null
    return "${rc}"
}

# Run a command (sapo_run), or with DRY_RUN=1 only print it as one shell-quoted line.
sapo_run_or_print() {
    if [[ "${DRY_RUN}" == 1 ]]; then
        sapo_quoted "$@"
    else
        sapo_run "$@"
    fi
}

# sapo_ray_start BLOCK ARGS...: `ray start ARGS...`, plus --block (stay in the foreground, as
# under srun) when BLOCK is 1; with DRY_RUN=1 only printed.
sapo_ray_start() {
    local block="$1"
    shift
    local cmd=(ray start "$@")
    if [[ "${block}" == 1 ]]; then
        cmd+=(--block)
    fi
    sapo_run_or_print "${cmd[@]}"
}

# The training command (an array) for the arguments: python3 -m openrlhf_sapo.cli.train_ppo_ray ...
sapo_train_cmd() {
    # shellcheck disable=SC2034  # used by the caller
    TRAIN_CMD=("${PYTHON}" -m "${SAPO_TRAIN_MODULE}" "$@")
    if [[ "${DRY_RUN}" == 1 ]]; then
        TRAIN_CMD+=(--dry-run)
    fi
}

# Launch training on this machine (OpenRLHF starts / joins a local Ray cluster itself), or with
# SAPO_LAUNCHER=ray-job submit it to a running Ray cluster (multinode/submit_sapo.sh sets it).
sapo_launch() {
    if [[ "${SAPO_LAUNCHER:-local}" == ray-job ]]; then
        sapo_submit_ray_job "$@"
        return
    fi
    sapo_choice SAPO_LAUNCHER "${SAPO_LAUNCHER:-local}" local ray-job
    sapo_train_cmd "$@"
    sapo_run "${TRAIN_CMD[@]}"
}

# Submit training to a running Ray cluster (RAY_ADDRESS, its dashboard address) with this
# checkout as the job's working directory. With DRY_RUN=1 the submission is only printed and
# the python command runs here, with --dry-run.
sapo_submit_ray_job() {
    local runtime_env
    runtime_env=$(printf '{"working_dir": "%s", "excludes": ["/.venv", "/.git", "/runs", "/data"]}' "${SAPO_REPO_ROOT}")
    local submit=(
        ray job submit
        --address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
        --runtime-env-json="${runtime_env}"
    )
    if [[ "${RAY_JOB_NO_WAIT:-0}" == 1 ]]; then
        submit+=(--no-wait)
    fi
    submit+=(-- "${PYTHON}" -m "${SAPO_TRAIN_MODULE}" "$@")
    if [[ "${DRY_RUN}" == 1 ]]; then
        printf '# DRY_RUN=1: not submitted: %s\n' "$(sapo_quoted "${submit[@]}")" >&2
        sapo_train_cmd "$@"
        sapo_run "${TRAIN_CMD[@]}"
        return
    fi
    sapo_run "${submit[@]}"
}
