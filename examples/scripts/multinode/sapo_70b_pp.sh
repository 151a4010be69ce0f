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
# The spec has no 70B recipe: this is text/sapo.sh's (Table 7's values reused on text data,
# shared blocks in text/recipe.sh, Table 7's SAPO column below) with a 72B chat model and its
# prompts through the chat template. DATA_DIR, SAVE_ROOT and LOG_ROOT must be on storage every
# node shares.
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
# shellcheck source=examples/scripts/text/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/../text/recipe.sh"
sapo_help "$@"

MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-72B-Instruct}"
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
DATASET="${DATASET:-math}"
sapo_choice DATASET "${DATASET}" gsm8k math
TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/${DATASET}/train.jsonl}"
EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/${DATASET}/test.jsonl}"
CHAT_TEMPLATE=1  # an Instruct model: prompts through its chat template
NUM_EPISODES="${NUM_EPISODES:-15}"
LR_SCHEDULER="${LR_SCHEDULER:-constant}"
RUN_NAME="${RUN_NAME:-${DATASET}-sapo-qwen2.5-72b}"

text_recipe critic  # Table 7's shared blocks on text data (text/recipe.sh), with the critic
MODEL_ARGS+=(--ds.adam_offload)  # 72B: the Adam states live in CPU memory

# Table 7's SAPO column (as in geo3k/sapo.sh and text/sapo.sh).
ALGO_ARGS=(
    --rollout.n_samples_per_prompt 1
    --train.batch_size 128
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

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${CRITIC_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${EVAL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${CLIP_ARGS[@]}" \
    "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
