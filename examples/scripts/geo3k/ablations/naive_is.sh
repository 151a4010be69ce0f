#!/usr/bin/env bash
# Ablation "naive-IS" (paper Table 2, SAPO_SPEC.md §3): SAPO's segment-level advantages with the
# ordinary token-level importance ratio (--algo.sapo.ratio token) instead of the segment ratio.
# Everything else is geo3k/sapo.sh (Table 7's SAPO column). Paper, 7B Geo3K: 47.92 vs 52.75.
#
#   bash examples/scripts/geo3k/ablations/naive_is.sh
#   DRY_RUN=1 MODEL_SIZE=3b bash examples/scripts/geo3k/ablations/naive_is.sh
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO with token-level importance ratios (naive-IS ablation) on Geo3K: geo3k/sapo.sh plus
--algo.sapo.ratio token. Every variable of geo3k/sapo.sh applies (MODEL_SIZE 3b|7b [7b],
MODEL_PATH, CRITIC_PATH, TRAIN_DATA, EVAL_DATA, FREEZE_VISION, LR_SCHEDULER).
  RUN_NAME       [geo3k-sapo-naive-is-qwen2.5-vl-MODEL_SIZE]"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=examples/scripts/common.sh
source "${HERE}/../../common.sh"
sapo_help "$@"

export RUN_NAME="${RUN_NAME:-geo3k-sapo-naive-is-qwen2.5-vl-${MODEL_SIZE:-7b}}"
exec bash "${HERE}/../sapo.sh" --algo.sapo.ratio token "$@"
