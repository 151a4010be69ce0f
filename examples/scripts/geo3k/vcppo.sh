#!/usr/bin/env bash
# VC-PPO on Geometry3K with Qwen2.5-VL-{3B,7B}-Instruct: the VC-PPO column of the paper's Table 7
# (SAPO_SPEC.md §6) on one 8-GPU node: PPO with decoupled GAE, the actor's advantages with
# lambda 0.99 and the critic's returns with lambda 1.0 (--algo.advantage.critic_lambd).
# VC-PPO's value pretraining is not part of Table 7 and is not done here (--critic.freezing_steps N
# would train only the critic for the first N steps). The blocks all Geo3K methods share, and how
# each Table 7 value maps to a flag, are in recipe.sh.
#
#   MODEL_SIZE=3b bash examples/scripts/geo3k/vcppo.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/vcppo.sh
set -euo pipefail

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
# shellcheck source=examples/scripts/geo3k/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/recipe.sh"

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

VC-PPO (GAE with actor lambda 0.99, critic lambda 1.0) on Geo3K.

Environment variables (defaults in brackets):
${GEO3K_USAGE}
  CRITIC_PATH    critic initialisation [MODEL_PATH]
  RUN_NAME       [geo3k-vcppo-qwen2.5-vl-MODEL_SIZE]"

sapo_help "$@"

geo3k_defaults  # the variables of GEO3K_USAGE, from the environment or recipe.sh's defaults
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
RUN_NAME="${RUN_NAME:-geo3k-vcppo-qwen2.5-vl-${MODEL_SIZE}}"

geo3k_recipe critic  # Table 7's shared blocks (recipe.sh), with the critic

# Table 7's VC-PPO column: one sample per prompt, decoupled GAE (gamma 1.0; lambda 0.99 for the
# actor's advantages, 1.0 for the critic's returns), k1 KL in the reward.
ALGO_ARGS=(
    --rollout.n_samples_per_prompt 1
    --train.batch_size 128
    --algo.advantage.estimator gae
    --algo.advantage.gamma 1.0
    --algo.advantage.lambd 0.99
    --algo.advantage.critic_lambd 1.0
    --algo.kl.init_coef 0.001
    --algo.kl.estimator k1
)

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${CRITIC_ARGS[@]}" "${DATA_ARGS[@]}" \
    "${EVAL_ARGS[@]}" "${ROLLOUT_ARGS[@]}" "${TRAIN_ARGS[@]}" "${CLIP_ARGS[@]}" \
    "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
