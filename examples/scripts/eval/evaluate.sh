#!/usr/bin/env bash
# Evaluate a trained checkpoint (or a base model) the way the paper reports accuracy: sampling at
# temperature 0.6, top-p 0.95, up to 2048 new tokens, answers read from the last \boxed{}; with
# python -m openrlhf_sapo.eval, which writes results.json, samples.jsonl and table.md (the paper's
# Table 1 layout, optionally next to the published rows).
#
#   bash examples/scripts/eval/evaluate.sh                                  # the 7B SAPO run on Geo3K
#   MODEL_PATH=Qwen/Qwen2.5-VL-7B-Instruct COMPARE_PAPER=7b bash examples/scripts/eval/evaluate.sh
#   BENCHMARKS="Geo3K=data/geo3k/test.jsonl MathVista=data/bench/mathvista.jsonl" \
#       bash examples/scripts/eval/evaluate.sh
#   DRY_RUN=1 bash examples/scripts/eval/evaluate.sh                        # print the command only
#
# The other benchmarks of the paper (LogicVista, MathVerse, WeMath, MathVista, DynaMath) are not
# prepared by prepare_data.sh: convert them to the jsonl format of openrlhf_sapo/eval/benchmarks.py.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra python -m openrlhf_sapo.eval flags]

Evaluates MODEL_PATH on BENCHMARKS and writes OUTPUT_DIR/{results.json,samples.jsonl,table.md}.

Environment variables (defaults in brackets):
  MODEL_PATH      model folder or hub id [SAVE_ROOT/geo3k-sapo-qwen2.5-vl-7b, the final model of
                  geo3k/sapo.sh]
  BENCHMARKS      space-separated NAME=FILE.jsonl, FILE.jsonl or data folders
                  [Geo3K=DATA_DIR/geo3k/test.jsonl]
  OUTPUT_DIR      [LOG_ROOT/eval/<basename of MODEL_PATH>]
  LABEL           row name in table.md [the model folder's name]
  COMPARE_PAPER   3b | 7b: add the paper's published rows to table.md [none]
  TEMPERATURE     [0.6]   TOP_P [0.95]   N_SAMPLES samples per prompt [1]
  MAX_NEW_TOKENS  [2048]
  BACKEND         auto | vllm | hf [auto]
  VLLM_TP         vLLM tensor parallel size [1]
  DRY_RUN         1: print the command instead of running it [0]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

MODEL_PATH="${MODEL_PATH:-${SAVE_ROOT}/geo3k-sapo-qwen2.5-vl-7b}"
read -r -a BENCH <<< "${BENCHMARKS:-Geo3K=${DATA_DIR}/geo3k/test.jsonl}"
(( ${#BENCH[@]} > 0 )) || sapo_die "BENCHMARKS is empty"
OUTPUT_DIR="${OUTPUT_DIR:-${LOG_ROOT}/eval/$(basename "${MODEL_PATH}")}"
BACKEND="${BACKEND:-auto}"
sapo_choice BACKEND "${BACKEND}" auto vllm hf

EVAL_CMD=(
    "${PYTHON}" -m openrlhf_sapo.eval
    --model "${MODEL_PATH}"
    --benchmarks "${BENCH[@]}"
    --output-dir "${OUTPUT_DIR}"
    --backend "${BACKEND}"
    --temperature "${TEMPERATURE:-0.6}"
    --top-p "${TOP_P:-0.95}"
    --n-samples "${N_SAMPLES:-1}"
    --max-new-tokens "${MAX_NEW_TOKENS:-2048}"
    --tensor-parallel-size "${VLLM_TP}"
)
if [[ -n "${LABEL:-}" ]]; then
    EVAL_CMD+=(--label "${LABEL}")
fi
if [[ -n "${COMPARE_PAPER:-}" ]]; then
    sapo_choice COMPARE_PAPER "${COMPARE_PAPER}" 3b 7b
    EVAL_CMD+=(--compare-paper "${COMPARE_PAPER}")
fi
EVAL_CMD+=("$@")

sapo_run_or_print "${EVAL_CMD[@]}"
