#!/usr/bin/env bash
# SAPO with a 70B-class model: Qwen2.5-72B-Instruct on GSM8K or MATH (text), submitted with
# `ray job submit` to a Ray cluster of NNODES x GPUS_PER_NODE GPUs (default 4 x 8). Rollout uses
# vLLM engines that span tensor AND pipeline parallel GPUs (--vllm.pipeline_parallel_size):
# VLLM_TP x VLLM_PP = 4 x 2 = 8 GPUs, one node, per engine, so 4 engines on 32 GPUs. Actor, critic,
# reference and vLLM share the same GPUs (hybrid engine: colocated, with sleep modes), ZeRO-3 with
# the Adam states offloaded to CPU.
#
#   RAY_ADDRESS=http://10.0.0.1:8265 bash examples/scripts/multinode/sapo_70b_pp.sh
#   DRY_RUN=1 bash examples/scripts/multinode/sapo_70b_pp.sh      # --dry-run here, no submission
#   SAPO_LAUNCHER=local bash examples/scripts/multinode/sapo_70b_pp.sh   # run from the head node
#
# The algorithm values are Table 7's SAPO column (SAPO_SPEC.md §6, as in geo3k/sapo.sh); the spec
# has no 70B recipe. DATA_DIR, SAVE_ROOT and LOG_ROOT must be on storage every node shares.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO with Qwen2.5-72B-Instruct on GSM8K / MATH over several nodes, vLLM with pipeline parallelism.

Environment variables (defaults in brackets; these defaults replace the shared ones below):
  MODEL_PATH     [Qwen/Qwen2.5-72B-Instruct]
  CRITIC_PATH    critic initialisation [MODEL_PATH]
  DATASET        gsm8k | math [math]
  TRAIN_DATA     [DATA_DIR/DATASET/train.jsonl]
  EVAL_DATA      [DATA_DIR/DATASET/test.jsonl]
  NNODES         [4]      GPUS_PER_NODE [8]
  VLLM_TP        vLLM tensor parallel size per engine [4]
  VLLM_PP        vLLM pipeline parallel size per engine [2]
  VLLM_GPU_UTIL  [0.5]
  MICRO_TRAIN_BATCH / MICRO_ROLLOUT_BATCH [1 / 2]
  NUM_EPISODES   passes over the first 7168 training prompts (14 steps each) [15]
  SAPO_LAUNCHER  ray-job (submit to RAY_ADDRESS) | local (run on this node, the Ray head) [ray-job]
  RAY_ADDRESS    [http://127.0.0.1:8265]
  REWARD_FUNC    [openrlhf_sapo/rewards/math_reward.py, relative to the job's working dir]
  LR_SCHEDULER   [constant]
  RUN_NAME       [DATASET-sapo-qwen2.5-72b]"

export NNODES="${NNODES:-4}"
export VLLM_TP="${VLLM_TP:-4}"
export VLLM_PP="${VLLM_PP:-2}"
export MICRO_TRAIN_BATCH="${MICRO_TRAIN_BATCH:-1}"
export MICRO_ROLLOUT_BATCH="${MICRO_ROLLOUT_BATCH:-2}"
export SAPO_LAUNCHER="${SAPO_LAUNCHER:-ray-job}"
if [[ "${SAPO_LAUNCHER}" == ray-job ]]; then
    export REWARD_FUNC="${REWARD_FUNC:-openrlhf_sapo/rewards/math_reward.py}"
fi
# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-72B-Instruct}"
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
DATASET="${DATASET:-math}"
sapo_choice DATASET "${DATASET}" gsm8k math
TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/${DATASET}/train.jsonl}"
EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/${DATASET}/test.jsonl}"
NUM_EPISODES="${NUM_EPISODES:-15}"
LR_SCHEDULER="${LR_SCHEDULER:-constant}"
RUN_NAME="${RUN_NAME:-${DATASET}-sapo-qwen2.5-72b}"

sapo_cluster_args critic
sapo_output_args "${RUN_NAME}"

MODEL_ARGS=(
    --actor.model_name_or_path "${MODEL_PATH}"
    --critic.model_name_or_path "${CRITIC_PATH}"
    --reward.remote_url "${REWARD_FUNC}"
    --ds.zero_stage 3
    --ds.param_dtype bf16
    --ds.adam_offload
    --actor.gradient_checkpointing_enable
)

DATA_ARGS=(
    --data.prompt_dataset "${TRAIN_DATA}"
    --data.input_key prompt
    --data.label_key label
    --data.apply_chat_template
    --data.max_samples 7168
    --eval.dataset "${EVAL_DATA}"
    --eval.steps "${EVAL_STEPS}"
    --eval.temperature 0.6
    --eval.n_samples_per_prompt 1
)

ROLLOUT_ARGS=(
    --rollout.batch_size 512
    --rollout.n_samples_per_prompt 1
    --rollout.micro_batch_size "${MICRO_ROLLOUT_BATCH}"
    --rollout.max_new_tokens 2048
    --data.max_len 3072
    --rollout.temperature 1.0
    --rollout.top_p 1.0
)

TRAIN_ARGS=(
    --train.num_episodes "${NUM_EPISODES}"
    --train.batch_size 128
    --train.micro_batch_size "${MICRO_TRAIN_BATCH}"
    --train.max_epochs 1
    --train.seed "${SEED}"
    --actor.adam.lr 1e-6
    --critic.adam.lr 2e-6
    --actor.lr_scheduler "${LR_SCHEDULER}"
    --critic.lr_scheduler "${LR_SCHEDULER}"
    --actor.eps_clip_low_high 0.2 0.28
    --actor.dual_clip 3.0
    --critic.value_clip 0.5
)

ALGO_ARGS=(
    --algo.advantage.estimator sapo
    --algo.advantage.gamma 1.0
    --algo.advantage.lambd 0.99
    --algo.kl.init_coef 0.001
    --algo.kl.estimator k1
    --algo.sapo.segmenter entropy
    --algo.sapo.topk_percent 30
    --algo.sapo.value_at end
    --algo.sapo.ratio segment
    --algo.sapo.adv_clip 5
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
