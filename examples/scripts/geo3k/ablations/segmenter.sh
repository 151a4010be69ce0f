#!/usr/bin/env bash
# Ablation of the segmentation strategy (paper Table 3, SAPO_SPEC.md §1): SAPO on Geo3K with
# responses cut at newlines, before step markers, or at low-probability tokens instead of at the
# top-30% entropy tokens. Everything else is geo3k/sapo.sh (Table 7's SAPO column).
# Paper, 7B Geo3K: newline 41.60, step 41.60, prob 44.43, entropy 52.75.
#
#   SEGMENTER=step bash examples/scripts/geo3k/ablations/segmenter.sh
#   DRY_RUN=1 SEGMENTER=lowprob bash examples/scripts/geo3k/ablations/segmenter.sh
#
# The step segmenter starts a segment at each STEP_PATTERN match; with the release's prompt
# (think, then \boxed{}) a response without "Step N" markers is one segment. The options of
# each segmenter (step pattern, low-probability threshold and K) keep the CLI's defaults
# unless set below.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO with another segmentation strategy on Geo3K: geo3k/sapo.sh plus --algo.sapo.segmenter.
Every variable of geo3k/sapo.sh applies (MODEL_SIZE 3b|7b [7b], MODEL_PATH, CRITIC_PATH,
TRAIN_DATA, EVAL_DATA, FREEZE_VISION, LR_SCHEDULER), and:
  SEGMENTER          newline | step | lowprob | entropy | fixed [newline]
  STEP_PATTERN       step: regex of a step marker [the CLI's: Step \\d+]
  LOWPROB_THRESHOLD  lowprob: a token sampled with probability below this is a cut point [CLI's: 0.9]
  LOWPROB_EVERY_K    lowprob: every K-th cut point ends a segment [CLI's: 4]
  FIXED_LENGTH       fixed: segment length in tokens [CLI's: 64]
  RUN_NAME           [geo3k-sapo-seg-SEGMENTER-qwen2.5-vl-MODEL_SIZE]"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=examples/scripts/common.sh
source "${HERE}/../../common.sh"
sapo_help "$@"

SEGMENTER="${SEGMENTER:-newline}"
sapo_choice SEGMENTER "${SEGMENTER}" newline step lowprob entropy fixed

SEGMENT_ARGS=(--algo.sapo.segmenter "${SEGMENTER}")
if [[ -n "${STEP_PATTERN:-}" ]]; then
    SEGMENT_ARGS+=(--algo.sapo.step_pattern "${STEP_PATTERN}")
fi
if [[ -n "${LOWPROB_THRESHOLD:-}" ]]; then
    SEGMENT_ARGS+=(--algo.sapo.lowprob_threshold "${LOWPROB_THRESHOLD}")
fi
if [[ -n "${LOWPROB_EVERY_K:-}" ]]; then
    SEGMENT_ARGS+=(--algo.sapo.lowprob_every_k "${LOWPROB_EVERY_K}")
fi
if [[ -n "${FIXED_LENGTH:-}" ]]; then
    SEGMENT_ARGS+=(--algo.sapo.fixed_length "${FIXED_LENGTH}")
fi

export RUN_NAME="${RUN_NAME:-geo3k-sapo-seg-${SEGMENTER}-qwen2.5-vl-${MODEL_SIZE:-7b}}"
exec bash "${HERE}/../sapo.sh" "${SEGMENT_ARGS[@]}" "$@"
