#!/usr/bin/env bash
# SAPO on Geometry3K with Qwen2.5-VL-{3B,7B}-Instruct: the paper's Table 7 recipe (SAPO_SPEC.md §6)
# on one 8-GPU node (ZeRO-3, vLLM rollout, every model colocated on the same GPUs). The blocks all
# Geo3K methods share, and how each Table 7 value maps to a flag, are in recipe.sh; this script
# adds Table 7's SAPO column.
#
#   bash examples/scripts/data/prepare_data.sh            # once: DATA_DIR/geo3k/{train,test}.jsonl
#   MODEL_SIZE=3b bash examples/scripts/geo3k/sapo.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/sapo.sh         # check the flags, print the config, no GPU
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/geo3k/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO (segment GAE + segment importance ratio, entropy segmentation top 30%) on Geo3K.

Environment variables (defaults in brackets):
${GEO3K_USAGE}
  CRITIC_PATH    critic initialisation [MODEL_PATH]
  RUN_NAME       [geo3k-sapo-qwen2.5-vl-MODEL_SIZE]"

sapo_help "$@"

geo3k_defaults  # the variables of GEO3K_USAGE, from the environment or recipe.sh's defaults
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
RUN_NAME="${RUN_NAME:-geo3k-sapo-qwen2.5-vl-${MODEL_SIZE}}"

geo3k_recipe critic  # Table 7's shared blocks (recipe.sh), with the critic

# Table 7's SAPO column: one sample per prompt; segment GAE (gamma 1.0, lambda 0.99) over
# segments that end at the top 30% entropy tokens, with the critic's value at each segment's end,
# the segment importance ratio and advantages clipped at 5 (the release's behaviour); k1 KL in
# the reward.
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
