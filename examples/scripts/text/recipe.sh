# shellcheck shell=bash
# The blocks the text-only math scripts share: text/{sapo,ppo,grpo}.sh (RhoMath-1.1B or
# DeepSeekMath-7B on GSM8K or MATH) and multinode/sapo_70b_pp.sh. Sourced after common.sh; not run
# on its own.
#
# The spec's recipe (SAPO_SPEC.md §6, Table 7) is the Geo3K one; it gives no text recipe, so Table
# 7's values are reused: the blocks of geo3k/recipe.sh (batch 512 / mini-batch 128 prompts, prompt
# 1024 / response 2048, learning rates, clip, evaluation; it also says how each Table 7 value maps
# to a flag) and, in each script, its method's column (gamma / lambda, KL, samples per prompt).
# Length of training: --data.max_samples 7168 (14 rollout batches of 512 per episode; GSM8K has
# 7473 training rows, MATH 7500) times NUM_EPISODES.
#
# Default models (text_model_path): the SFT checkpoints of RhoMath-1.1B and DeepSeekMath-7B that
# VinePPO released (realtreetune/*), one per dataset. They were fine-tuned on plain-text prompts, so
# prompts are fed as raw text (CHAT_TEMPLATE=0), and the reward reads the last \boxed{} of the
# response: prepare the data with an instruction that matches the model's answer format
# (prepare_data.sh passes extra flags such as --instruction to the data modules), or set MODEL_PATH
# to a chat model and CHAT_TEMPLATE=1.
#
# A text/*.sh script lists TEXT_USAGE's variables in its -h text, then (after sapo_help)
#   text_defaults                  # the variables of TEXT_USAGE: environment or default
# sets its own defaults (RUN_NAME; CRITIC_PATH with a critic), then
#   text_recipe critic|no_critic   # the arrays of geo3k/recipe.sh's table7_args, on text data
# and adds its method's ALGO_ARGS before the launch line. (sapo_70b_pp.sh sets other defaults:
# MODEL_PATH, CRITIC_PATH, TRAIN_DATA, EVAL_DATA, CHAT_TEMPLATE=1, NUM_EPISODES, LR_SCHEDULER,
# RUN_NAME, the variables text_recipe reads.)

# shellcheck source=examples/scripts/geo3k/recipe.sh
source "$(dirname "${BASH_SOURCE[0]}")/../geo3k/recipe.sh"

# The text-task variables, for the -h text of text/*.sh.
# shellcheck disable=SC2034  # used by the sourcing script
TEXT_USAGE="  MODEL          rhomath | deepseekmath [rhomath]
  DATASET        gsm8k | math [gsm8k]
  MODEL_PATH     actor / reference (and critic) model [realtreetune/rho-1b-sft-GSM8K,
                 rho-1b-sft-MATH, deepseekmath-7b-sft-GSM8K or deepseekmath-7b-sft-MATH-v2]
  TRAIN_DATA     [DATA_DIR/DATASET/train.jsonl]
  EVAL_DATA      [DATA_DIR/DATASET/test.jsonl]
  CHAT_TEMPLATE  1: --data.apply_chat_template [0]
  INPUT_TEMPLATE --data.input_template, a format string with {} (only with CHAT_TEMPLATE=0) [none]
  NUM_EPISODES   passes over the first 7168 training prompts (14 steps each) [15]
  LR_SCHEDULER   [constant]"

# text_defaults: TEXT_USAGE's variables from the environment, or their defaults.
text_defaults() {
    MODEL="${MODEL:-rhomath}"
    DATASET="${DATASET:-gsm8k}"
    sapo_choice MODEL "${MODEL}" rhomath deepseekmath
    sapo_choice DATASET "${DATASET}" gsm8k math
    MODEL_PATH="${MODEL_PATH:-$(text_model_path "${MODEL}" "${DATASET}")}"
    TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/${DATASET}/train.jsonl}"
    EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/${DATASET}/test.jsonl}"
    CHAT_TEMPLATE="${CHAT_TEMPLATE:-0}"
    INPUT_TEMPLATE="${INPUT_TEMPLATE:-}"
    NUM_EPISODES="${NUM_EPISODES:-15}"
    LR_SCHEDULER="${LR_SCHEDULER:-constant}"
}

# text_model_path MODEL DATASET: the default actor / critic / reference model (VinePPO's SFT
# checkpoint of MODEL for DATASET).
text_model_path() {
    case "$1/$2" in
        rhomath/gsm8k) echo realtreetune/rho-1b-sft-GSM8K ;;
        rhomath/math) echo realtreetune/rho-1b-sft-MATH ;;
        deepseekmath/gsm8k) echo realtreetune/deepseekmath-7b-sft-GSM8K ;;
        deepseekmath/math) echo realtreetune/deepseekmath-7b-sft-MATH-v2 ;;
        *) sapo_die "no default model for MODEL=$1 DATASET=$2" ;;
    esac
}

# text_recipe critic|no_critic: table7_args on a text dataset: the first 7168 training prompts per
# episode, no images, prompts through the chat template (CHAT_TEMPLATE=1), an input template
# (INPUT_TEMPLATE) or as raw text.
# shellcheck disable=SC2034  # the arrays are used by the sourcing script
text_recipe() {
    table7_args "$1"
    DATA_ARGS+=(--data.max_samples 7168)
    if [[ "${CHAT_TEMPLATE}" == 1 ]]; then
        DATA_ARGS+=(--data.apply_chat_template)
    elif [[ -n "${INPUT_TEMPLATE}" ]]; then
        DATA_ARGS+=(--data.input_template "${INPUT_TEMPLATE}")
    fi
}
