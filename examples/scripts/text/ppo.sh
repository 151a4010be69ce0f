#!/usr/bin/env bash
# PPO (token-level GAE with a critic, lambda 0.95) on a text-only math task: RhoMath-1.1B or
# DeepSeekMath-7B (MODEL) on GSM8K or MATH (DATASET), one 8-GPU node (ZeRO-3, vLLM rollout, every
# model colocated on the same GPUs).
#
#   bash examples/scripts/data/prepare_data.sh                 # once: DATA_DIR/{gsm8k,math}/...
#   MODEL=deepseekmath DATASET=math bash examples/scripts/text/ppo.sh
#   DRY_RUN=1 bash examples/scripts/text/ppo.sh
#
# Table 7's values are reused on text data, and the default models are VinePPO's SFT checkpoints:
# text/recipe.sh says how; this script adds Table 7's PPO column.
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/text/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

PPO (token-level GAE with a critic, gamma 1.0, lambda 0.95) on GSM8K / MATH.

Environment variables (defaults in brackets):
${TEXT_USAGE}
  CRITIC_PATH    critic initialisation [MODEL_PATH]
  RUN_NAME       [DATASET-ppo-MODEL]"

sapo_help "$@"

text_defaults  # the variables of TEXT_USAGE, from the environment or recipe.sh's defaults
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
RUN_NAME="${RUN_NAME:-${DATASET}-ppo-${MODEL}}"

text_recipe critic  # Table 7's shared blocks on text data (text/recipe.sh), with the critic

# Table 7's PPO column (as in geo3k/ppo.sh): one sample per prompt, token-level GAE (gamma 1.0,
# lambda 0.95), k1 KL in the reward.
ALGO_ARGS=(
    --rollout.n_samples_per_prompt 1
    --train.batch_size 128
    --algo.advantage.estimator gae
    --algo.advantage.gamma 1.0
    --algo.advantage.lambd 0.95
    --algo.kl.init_coef 0.001
    --algo.kl.estimator k1
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${CRITIC_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${EVAL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${CLIP_ARGS[@]}" \
    "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
