#!/usr/bin/env bash
# Prepare the training / evaluation data of the example scripts: Geometry3K (images as PNG files),
# GSM8K and MATH (train) / MATH500 (test) as OpenRLHF prompt jsonl, with
# python -m openrlhf_sapo.data.{geo3k,gsm8k,math}. Downloads from the Hugging Face hub unless
# --from-disk is passed. Writes DATA_DIR/<dataset>/{train,test,...}.jsonl, the paths the training
# scripts read by default.
#
#   bash examples/scripts/data/prepare_data.sh
#   DATASETS=geo3k DATA_DIR=/shared/data bash examples/scripts/data/prepare_data.sh --overwrite
#   DRY_RUN=1 bash examples/scripts/data/prepare_data.sh        # print the commands only
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra flags for every data module]

Writes DATA_DIR/<dataset>/<split>.jsonl for each dataset of DATASETS. Extra flags go to every
data module (see python -m openrlhf_sapo.data.geo3k -h); pass module-specific ones (e.g.
--embed-images for geo3k) with DATASETS set to that one dataset.

Environment variables (defaults in brackets):
  DATASETS   space-separated, from geo3k gsm8k math [geo3k gsm8k math]
  DATA_DIR   output root [<repo>/data]
  PYTHON     [python3]
  DRY_RUN    1: print the commands instead of running them [0]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

read -r -a SETS <<< "${DATASETS:-geo3k gsm8k math}"
(( ${#SETS[@]} > 0 )) || sapo_die "DATASETS is empty"
for name in "${SETS[@]}"; do
    sapo_choice DATASETS "${name}" geo3k gsm8k math
done

for name in "${SETS[@]}"; do
    sapo_run_or_print "${PYTHON}" -m "openrlhf_sapo.data.${name}" --output-dir "${DATA_DIR}/${name}" "$@"
done
