#!/usr/bin/env bash
# Ablation of the entropy segmenter's top-k percentage (paper: best at 30%, worse at 10% and above
# 30%): one SAPO run on Geo3K per value of TOPK_VALUES, one after the other, each with its own
# RUN_NAME and so its own checkpoint and log folders. Everything else is geo3k/sapo.sh (Table 7).
#
#   bash examples/scripts/geo3k/ablations/topk_sweep.sh
#   TOPK_VALUES="10 50" MODEL_SIZE=3b bash examples/scripts/geo3k/ablations/topk_sweep.sh
#   DRY_RUN=1 bash examples/scripts/geo3k/ablations/topk_sweep.sh   # one config per value
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO on Geo3K once per top-k percentage: geo3k/sapo.sh plus --algo.sapo.topk_percent K.
Every variable of geo3k/sapo.sh applies (MODEL_SIZE 3b|7b [7b], MODEL_PATH, CRITIC_PATH,
TRAIN_DATA, EVAL_DATA, FREEZE_VISION, LR_SCHEDULER), and:
  TOPK_VALUES    space-separated percentages in (0, 100] [10 20 30 40 50]
  RUN_PREFIX     run K is named RUN_PREFIX-topkK [geo3k-sapo-qwen2.5-vl-MODEL_SIZE]
A run that fails stops the sweep."

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=examples/scripts/common.sh
source "${HERE}/../../common.sh"
sapo_help "$@"

read -r -a TOPK <<< "${TOPK_VALUES:-10 20 30 40 50}"
(( ${#TOPK[@]} > 0 )) || sapo_die "TOPK_VALUES is empty"
RUN_PREFIX="${RUN_PREFIX:-geo3k-sapo-qwen2.5-vl-${MODEL_SIZE:-7b}}"

for k in "${TOPK[@]}"; do
    RUN_NAME="${RUN_PREFIX}-topk${k}" bash "${HERE}/../sapo.sh" --algo.sapo.topk_percent "${k}" "$@"
done
