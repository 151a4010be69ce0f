#!/usr/bin/env bash
# GSPO on Geometry3K with Qwen2.5-VL-{3B,7B}-Instruct: GRPO's setup with GSPO's sequence-level
# importance ratio (upstream's --actor.policy_loss_type gspo: the geometric mean of the token
# ratios of a response, sequence-mean loss aggregation). One 8-GPU node, ZeRO-3, vLLM, colocated.
#
# GSPO is not in the paper's Table 7: everything is the GRPO column (SAPO_SPEC.md §6, grpo.sh)
# except the clip range, which is GSPO's own (Zheng et al. 2025: 3e-4 / 4e-4; a sequence ratio
# stays much closer to 1 than a token ratio, so 0.2 / 0.28 would almost never clip), and no dual
# clip. The blocks all Geo3K methods share, and how each Table 7 value maps to a flag, are in
# recipe.sh.
#
#   MODEL_SIZE=3b bash examples/scripts/geo3k/gspo.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/gspo.sh
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/geo3k/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

GSPO (sequence-level ratio, group_norm advantages, 8 samples per prompt, no critic) on Geo3K.

Environment variables (defaults in brackets):
${GEO3K_USAGE}
  RUN_NAME       [geo3k-gspo-qwen2.5-vl-MODEL_SIZE]"

sapo_help "$@"

geo3k_defaults  # the variables of GEO3K_USAGE, from the environment or recipe.sh's defaults
RUN_NAME="${RUN_NAME:-geo3k-gspo-qwen2.5-vl-${MODEL_SIZE}}"

geo3k_recipe no_critic  # Table 7's shared blocks (recipe.sh), without a critic; not its CLIP_ARGS

# GRPO's column (8 samples per prompt: 1024 samples per mini-batch, group_norm advantages, k3 KL
# loss 0.01) with upstream's GSPO loss and GSPO's clip range instead of Table 7's.
ALGO_ARGS=(
    --rollout.n_samples_per_prompt 8
    --train.batch_size 1024
    --actor.policy_loss_type gspo
    --actor.eps_clip_low_high 3e-4 4e-4
    --algo.advantage.estimator group_norm
    --algo.advantage.gamma 1.0
    --algo.kl.use_loss
    --algo.kl.estimator k3
    --algo.kl.init_coef 0.01
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${EVAL_ARGS[@]}" \
    "${ROLLOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
