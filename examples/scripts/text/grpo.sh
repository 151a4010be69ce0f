#!/usr/bin/env bash
# GRPO (group_norm advantages, 8 samples per prompt, k3 KL loss 0.01, no critic) on a text-only
# math task: RhoMath-1.1B or DeepSeekMath-7B (MODEL) on GSM8K or MATH (DATASET), one 8-GPU node
# (ZeRO-3, vLLM rollout, every model colocated on the same GPUs).
#
#   bash examples/scripts/data/prepare_data.sh                 # once: DATA_DIR/{gsm8k,math}/...
#   MODEL=deepseekmath DATASET=math bash examples/scripts/text/grpo.sh
#   DRY_RUN=1 bash examples/scripts/text/grpo.sh
#
# Table 7's values are reused on text data, and the default models are VinePPO's SFT checkpoints:
# text/recipe.sh says how; this script adds Table 7's GRPO column.
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/text/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

GRPO (group_norm advantages, 8 samples per prompt, k3 KL loss 0.01, no critic) on GSM8K / MATH.

Environment variables (defaults in brackets):
${TEXT_USAGE}
  RUN_NAME       [DATASET-grpo-MODEL]"

sapo_help "$@"

text_defaults  # the variables of TEXT_USAGE, from the environment or recipe.sh's defaults
RUN_NAME="${RUN_NAME:-${DATASET}-grpo-${MODEL}}"

text_recipe no_critic  # Table 7's shared blocks on text data (text/recipe.sh), without a critic

# Table 7's GRPO column (as in geo3k/grpo.sh): 8 samples per prompt (so the mini-batch of 128
# prompts is 1024 samples), group-normalised outcome advantages, k3 KL as a loss with
# coefficient 0.01.
ALGO_ARGS=(
    --rollout.n_samples_per_prompt 8
    --train.batch_size 1024
    --algo.advantage.estimator group_norm
    --algo.advantage.gamma 1.0
    --algo.kl.use_loss
    --algo.kl.estimator k3
    --algo.kl.init_coef 0.01
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_ARGS[@]}" \
    "${ROLLOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${CLIP_ARGS[@]}" "${ALGO_ARGS[@]}" \
    "${OUTPUT_ARGS[@]}" "$@"
