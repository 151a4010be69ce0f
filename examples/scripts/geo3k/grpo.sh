#!/usr/bin/env bash
# GRPO on Geometry3K with Qwen2.5-VL-{3B,7B}-Instruct: the GRPO column of the paper's Table 7
# (SAPO_SPEC.md §6) on one 8-GPU node (ZeRO-3, vLLM, colocated models): 8 samples per prompt,
# group-normalised outcome advantages (group_norm), no critic, k3 KL as a loss with coefficient 0.01.
# The blocks all Geo3K methods share, and how each Table 7 value maps to a flag, are in recipe.sh.
#
#   MODEL_SIZE=3b bash examples/scripts/geo3k/grpo.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/grpo.sh
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/geo3k/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

GRPO (group_norm advantages, 8 samples per prompt, k3 KL loss 0.01, no critic) on Geo3K.

Environment variables (defaults in brackets):
${GEO3K_USAGE}
  RUN_NAME       [geo3k-grpo-qwen2.5-vl-MODEL_SIZE]"

sapo_help "$@"

geo3k_defaults  # the variables of GEO3K_USAGE, from the environment or recipe.sh's defaults
RUN_NAME="${RUN_NAME:-geo3k-grpo-qwen2.5-vl-${MODEL_SIZE}}"

geo3k_recipe no_critic  # Table 7's shared blocks (recipe.sh), without a critic

# Table 7's GRPO column: 8 samples per prompt (so the mini-batch of 128 prompts is 1024 samples),
# group-normalised outcome advantages, k3 KL as a loss with coefficient 0.01.
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
