#!/usr/bin/env bash
# SAPO on a text-only math task: RhoMath-1.1B or DeepSeekMath-7B (MODEL) on GSM8K or MATH
# (DATASET), one 8-GPU node (ZeRO-3, vLLM rollout, every model colocated on the same GPUs).
#
#   bash examples/scripts/data/prepare_data.sh                 # once: DATA_DIR/{gsm8k,math}/...
#   MODEL=deepseekmath DATASET=math bash examples/scripts/text/sapo.sh
#   DRY_RUN=1 bash examples/scripts/text/sapo.sh
#
# The spec's recipe (SAPO_SPEC.md §6, Table 7) is the Geo3K one; it gives no text recipe, so the
# per-method values of Table 7 are reused here (gamma/lambda, learning rates, KL, clip, batch 512 /
# mini-batch 128, prompt 1024 / response 2048). Length of training: --data.max_samples 7168
# (14 rollout batches of 512 per episode; GSM8K has 7473 training rows, MATH 7500) times
# NUM_EPISODES. See geo3k/sapo.sh for how each Table 7 value maps to a flag.
#
# Default models: the SFT checkpoints of RhoMath-1.1B and DeepSeekMath-7B that VinePPO released
# (realtreetune/*), one per dataset. They were fine-tuned on plain-text prompts, so prompts are fed
# as raw text (CHAT_TEMPLATE=0), and the reward reads the last \boxed{} of the response: prepare the data
# with an instruction that matches the model's answer format (prepare_data.sh passes extra flags
# such as --instruction to the data modules), or set MODEL_PATH to a chat model and CHAT_TEMPLATE=1.
set -euo pipefail

USAGE="Usage: [VAR=value ...] $(basename "$0") [extra train_ppo_ray flags]

SAPO (segment GAE + segment importance ratio, entropy segmentation top 30%) on GSM8K / MATH.

Environment variables (defaults in brackets):
  MODEL          rhomath | deepseekmath [rhomath]
  DATASET        gsm8k | math [gsm8k]
  MODEL_PATH     actor / critic / reference model [realtreetune/rho-1b-sft-GSM8K,
                 rho-1b-sft-MATH, deepseekmath-7b-sft-GSM8K or deepseekmath-7b-sft-MATH-v2]
  CRITIC_PATH    critic initialisation [MODEL_PATH]
  TRAIN_DATA     [DATA_DIR/DATASET/train.jsonl]
  EVAL_DATA      [DATA_DIR/DATASET/test.jsonl]
  CHAT_TEMPLATE  1: --data.apply_chat_template [0]
  INPUT_TEMPLATE --data.input_template, a format string with {} (only with CHAT_TEMPLATE=0) [none]
  NUM_EPISODES   passes over the first 7168 training prompts (14 steps each) [15]
  LR_SCHEDULER   [constant]
  RUN_NAME       [DATASET-sapo-MODEL]"

# shellcheck source=examples/scripts/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"
sapo_help "$@"

MODEL="${MODEL:-rhomath}"
DATASET="${DATASET:-gsm8k}"
sapo_choice MODEL "${MODEL}" rhomath deepseekmath
sapo_choice DATASET "${DATASET}" gsm8k math
case "${MODEL}/${DATASET}" in
    rhomath/gsm8k) DEFAULT_MODEL_PATH=realtreetune/rho-1b-sft-GSM8K ;;
    rhomath/math) DEFAULT_MODEL_PATH=realtreetune/rho-1b-sft-MATH ;;
    deepseekmath/gsm8k) DEFAULT_MODEL_PATH=realtreetune/deepseekmath-7b-sft-GSM8K ;;
    deepseekmath/math) DEFAULT_MODEL_PATH=realtreetune/deepseekmath-7b-sft-MATH-v2 ;;
esac
MODEL_PATH="${MODEL_PATH:-${DEFAULT_MODEL_PATH}}"
CRITIC_PATH="${CRITIC_PATH:-${MODEL_PATH}}"
TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/${DATASET}/train.jsonl}"
EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/${DATASET}/test.jsonl}"
CHAT_TEMPLATE="${CHAT_TEMPLATE:-0}"
NUM_EPISODES="${NUM_EPISODES:-15}"
LR_SCHEDULER="${LR_SCHEDULER:-constant}"
RUN_NAME="${RUN_NAME:-${DATASET}-sapo-${MODEL}}"

sapo_cluster_args critic
sapo_output_args "${RUN_NAME}"

MODEL_ARGS=(
    --actor.model_name_or_path "${MODEL_PATH}"
    --critic.model_name_or_path "${CRITIC_PATH}"
    --reward.remote_url "${REWARD_FUNC}"
    --ds.zero_stage 3
    --ds.param_dtype bf16
    --actor.gradient_checkpointing_enable
)

DATA_ARGS=(
    --data.prompt_dataset "${TRAIN_DATA}"
    --data.input_key prompt
    --data.label_key label
    --data.max_samples 7168
    --eval.dataset "${EVAL_DATA}"
    --eval.steps "${EVAL_STEPS}"
    --eval.temperature 0.6
    --eval.n_samples_per_prompt 1
)
if [[ "${CHAT_TEMPLATE}" == 1 ]]; then
    DATA_ARGS+=(--data.apply_chat_template)
elif [[ -n "${INPUT_TEMPLATE:-}" ]]; then
    DATA_ARGS+=(--data.input_template "${INPUT_TEMPLATE}")
fi

ROLLOUT_ARGS=(
    --rollout.batch_size 512
    --rollout.n_samples_per_prompt 1
    --rollout.micro_batch_size "${MICRO_ROLLOUT_BATCH}"
    --rollout.max_new_tokens 2048
    --data.max_len 3072
    --rollout.temperature 1.0
    --rollout.top_p 1.0
)

TRAIN_ARGS=(
    --train.num_episodes "${NUM_EPISODES}"
    --train.batch_size 128
    --train.micro_batch_size "${MICRO_TRAIN_BATCH}"
    --train.max_epochs 1
    --train.seed "${SEED}"
    --actor.adam.lr 1e-6
    --critic.adam.lr 2e-6
    --actor.lr_scheduler "${LR_SCHEDULER}"
    --critic.lr_scheduler "${LR_SCHEDULER}"
    --actor.eps_clip_low_high 0.2 0.28
    --actor.dual_clip 3.0
    --critic.value_clip 0.5
)

ALGO_ARGS=(
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

sapo_launch "${CLUSTER_ARGS[@]}" "${MODEL_ARGS[@]}" "${DATA_ARGS[@]}" "${ROLLOUT_ARGS[@]}" \
    "${TRAIN_ARGS[@]}" "${ALGO_ARGS[@]}" "${OUTPUT_ARGS[@]}" "$@"
