#!/usr/bin/env bash
# GRPO on Geometry3K with Qwen2.5-VL-{3B,7B}-Instruct: the GRPO column of the paper's Table 7
# (SAPO_SPEC.md §6) on one 8-GPU node (ZeRO-3, vLLM, colocated models): 8 samples per prompt,
# group-normalised outcome advantages (group_norm), no critic, k3 KL as a loss with coefficient 0.01.
#
#   MODEL_SIZE=3b bash examples/scripts/geo3k/grpo.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/grpo.sh
#
# Table 7 -> OpenRLHF 0.11.2 flags (as in sapo.sh):
#   200 steps          no such flag: --data.max_samples 2048 (4 rollout batches of 512) x
#                      --train.num_episodes 50. This drops the same last 53 of Geo3K's 2101
#                      training rows every episode (the release's dataloader drops a random
#                      53 per epoch with drop_last).
#   batch 512          --rollout.batch_size 512 (prompts per step)
#   mini-batch 128     --train.batch_size 1024 = 128 prompts x 8 samples (OpenRLHF counts
#                      samples; the release's ppo_mini_batch_size counts prompts): 4 updates per step
#   prompt 1024 /      --rollout.max_new_tokens 2048, --data.max_len 3072 (prompt + response).
#   response 2048      OpenRLHF has no prompt-length flag: a sequence is cut at --data.max_len.
#   clip 0.2 / 0.28    --actor.eps_clip_low_high 0.2 0.28; dual clip 3.0 (SAPO_SPEC.md §3)
#   eval temp 0.6      --eval.temperature 0.6. Eval top-p 0.95 has no flag: OpenRLHF's eval reuses
#   top-p 0.95         the rollout's --rollout.top_p (1.0 here, for training). The paper's numbers
#                      come from examples/scripts/eval/evaluate.sh (temperature 0.6, top-p 0.95).
#   LR schedule        not in Table 7; constant, as the release's verl 0.4.1 defaults (OpenRLHF's
#                      default is cosine with warmup): LR_SCHEDULER overrides.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

GRPO (group_norm advantages, 8 samples per prompt, k3 KL loss 0.01, no critic) on Geo3K.

Environment variables (defaults in brackets):
  MODEL_SIZE     3b | 7b: Qwen/Qwen2.5-VL-{3B,7B}-Instruct [7b]
  MODEL_PATH     actor / reference model, overrides MODEL_SIZE
  TRAIN_DATA     [DATA_DIR/geo3k/train.jsonl]
  EVAL_DATA      [DATA_DIR/geo3k/test.jsonl]
  FREEZE_VISION  1: freeze the actor's vision tower [0]
  LR_SCHEDULER   [constant]
  RUN_NAME       [geo3k-grpo-qwen2.5-vl-MODEL_SIZE]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

MODEL_SIZE="${MODEL_SIZE:-7b}"
sapo_choice MODEL_SIZE "${MODEL_SIZE}" 3b 7b
MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-${MODEL_SIZE^^}-Instruct}"
TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/geo3k/train.jsonl}"
EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/geo3k/test.jsonl}"
FREEZE_VISION="${FREEZE_VISION:-0}"
LR_SCHEDULER="${LR_SCHEDULER:-constant}"
RUN_NAME="${RUN_NAME:-geo3k-grpo-qwen2.5-vl-${MODEL_SIZE}}"
NUM_EPISODES=$(sapo_episodes 200 2048 512)  # 200 steps

sapo_cluster_args no_critic
sapo_output_args "${RUN_NAME}"

MODEL_ARGS=(
    --actor.model_name_or_path "${MODEL_PATH}"
    --reward.remote_url "${REWARD_FUNC}"
    --ds.zero_stage 3
    --ds.param_dtype bf16
    --actor.gradient_checkpointing_enable
)
if [[ "${FREEZE_VISION}" == 1 ]]; then
    MODEL_ARGS+=(--actor.freeze_visual_encoder)
fi

DATA_ARGS=(
    --data.prompt_dataset "${TRAIN_DATA}"
    --data.input_key prompt
    --data.label_key label
    --data.image_key images
    --data.max_images_per_prompt 1
    --data.apply_chat_template
    --data.max_samples 2048
    --eval.dataset "${EVAL_DATA}"
    --eval.steps "${EVAL_STEPS}"
    --eval.temperature 0.6
    --eval.n_samples_per_prompt 1
)

ROLLOUT_ARGS=(
    --rollout.batch_size 512
    --rollout.n_samples_per_prompt 8
    --rollout.micro_batch_size "${MICRO_ROLLOUT_BATCH}"
    --rollout.max_new_tokens 2048
    --data.max_len 3072
    --rollout.temperature 1.0
    --rollout.top_p 1.0
)

TRAIN_ARGS=(
    --train.num_episodes "${NUM_EPISODES}"
    --train.batch_size 1024
    --train.micro_batch_size "${MICRO_TRAIN_BATCH}"
    --train.max_epochs 1
    --train.seed "${SEED}"
    --actor.adam.lr 1e-6
    --actor.lr_scheduler "${LR_SCHEDULER}"
    --actor.eps_clip_low_high 0.2 0.28
    --actor.dual_clip 3.0
)

ALGO_ARGS=(
    --algo.advantage.estimator group_norm
    --algo.advantage.gamma 1.0
    --algo.kl.use_loss
    --algo.kl.estimator k3
    --algo.kl.init_coef 0.01
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
