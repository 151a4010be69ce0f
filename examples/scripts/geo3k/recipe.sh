# shellcheck shell=bash
# The paper's Table 7 recipe (SAPO_SPEC.md §6) as OpenRLHF 0.11.2 flag arrays: the blocks every
# method shares. Sourced, after common.sh, by geo3k/{sapo,ppo,grpo,vcppo,gspo}.sh, and through
# text/recipe.sh by the text and 70B scripts (the spec has no other recipe: they reuse Table 7's
# values). Not run on its own.
#
# A method script lists GEO3K_USAGE's variables in its -h text, then (after sapo_help)
#   geo3k_defaults                  # the variables of GEO3K_USAGE: environment or default
# sets its own defaults (RUN_NAME; CRITIC_PATH with a critic), then
#   geo3k_recipe critic|no_critic   # fills the arrays below
# and adds only its method's column of Table 7 (ALGO_ARGS: samples per prompt and the matching
# --train.batch_size, estimator, gamma / lambda, KL, ...) before the launch line:
#   CLUSTER_ARGS OUTPUT_ARGS   GPUs, colocation, vLLM engines; checkpoints and logs (common.sh)
#   MODEL_ARGS                 actor, reward function, ZeRO-3 / bf16 / gradient checkpointing
#   CRITIC_ARGS                critic model, learning rate, value clip (empty for no_critic)
#   DATA_ARGS EVAL_ARGS        training and evaluation data
#   ROLLOUT_ARGS TRAIN_ARGS    rollout batch and lengths; episodes, learning rate, seed
#   CLIP_ARGS                  the PPO clip range (every method but GSPO, which has its own)
#
# Table 7 -> OpenRLHF 0.11.2 flags:
#   200 steps          no such flag: --data.max_samples 2048 (4 rollout batches of 512) x
#                      --train.num_episodes 50. This drops the same last 53 of Geo3K's 2101
#                      training rows every episode (the release's dataloader drops a random
#                      53 per epoch with drop_last).
#   batch 512          --rollout.batch_size 512 (prompts per step)
#   mini-batch 128     --train.batch_size 128 x samples per prompt (OpenRLHF counts samples;
#                      the release's ppo_mini_batch_size counts prompts): 4 updates per step.
#                      Set by each method with its samples per prompt (GRPO: 8, so 1024).
#   prompt 1024 /      --rollout.max_new_tokens 2048, --data.max_len 3072 (prompt + response).
#   response 2048      OpenRLHF has no prompt-length flag: a sequence is cut at --data.max_len.
#   clip 0.2 / 0.28    --actor.eps_clip_low_high 0.2 0.28; dual clip 3.0 (SAPO_SPEC.md §3)
#   learning rates     --actor.adam.lr 1e-6; --critic.adam.lr 2e-6 with a critic
#   eval temp 0.6      --eval.temperature 0.6. Eval top-p 0.95 has no flag: OpenRLHF's eval reuses
#   top-p 0.95         the rollout's --rollout.top_p (1.0 here, for training). The paper's numbers
#                      come from examples/scripts/eval/evaluate.sh (temperature 0.6, top-p 0.95).
#   LR schedule        not in Table 7; constant, as the release's verl 0.4.1 defaults (OpenRLHF's
#                      default is cosine with warmup): LR_SCHEDULER overrides.
#   per method         estimator, gamma / lambda, critic lambda, KL (in the reward or as a loss,
#                      estimator, coefficient), samples per prompt: in each method's script.

# The Geo3K variables, for the -h text of each method script.
# shellcheck disable=SC2034  # used by the sourcing script
GEO3K_USAGE="  MODEL_SIZE     3b | 7b: Qwen/Qwen2.5-VL-{3B,7B}-Instruct [7b]
  MODEL_PATH     actor / reference (and critic) model, overrides MODEL_SIZE
  TRAIN_DATA     [DATA_DIR/geo3k/train.jsonl]
  EVAL_DATA      [DATA_DIR/geo3k/test.jsonl]
  FREEZE_VISION  1: freeze the vision towers of the actor (and the critic) [0]
  LR_SCHEDULER   [constant]"

# geo3k_defaults: GEO3K_USAGE's variables from the environment, or their defaults.
geo3k_defaults() {
    MODEL_SIZE="${MODEL_SIZE:-7b}"
    sapo_choice MODEL_SIZE "${MODEL_SIZE}" 3b 7b
    MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-${MODEL_SIZE^^}-Instruct}"
    TRAIN_DATA="${TRAIN_DATA:-${DATA_DIR}/geo3k/train.jsonl}"
    EVAL_DATA="${EVAL_DATA:-${DATA_DIR}/geo3k/test.jsonl}"
    FREEZE_VISION="${FREEZE_VISION:-0}"
    LR_SCHEDULER="${LR_SCHEDULER:-constant}"
}

# table7_args critic|no_critic: the task-independent blocks (every array above; DATA_ARGS only
# with the prompt / label keys of prepare_data.sh's jsonl). Reads MODEL_PATH, CRITIC_PATH (with a
# critic), TRAIN_DATA, EVAL_DATA, NUM_EPISODES, LR_SCHEDULER and RUN_NAME from the caller.
# shellcheck disable=SC2034  # the arrays are used by the sourcing script
table7_args() {
    local critic="$1"
    sapo_choice "critic" "${critic}" critic no_critic
    sapo_cluster_args "${critic}"
    sapo_output_args "${RUN_NAME}"

    MODEL_ARGS=(
        --actor.model_name_or_path "${MODEL_PATH}"
        --reward.remote_url "${REWARD_FUNC}"
        --ds.zero_stage 3
        --ds.param_dtype bf16
        --actor.gradient_checkpointing_enable
    )

    CRITIC_ARGS=()
    if [[ "${critic}" == critic ]]; then
        CRITIC_ARGS=(
            --critic.model_name_or_path "${CRITIC_PATH}"
            --critic.adam.lr 2e-6
            --critic.lr_scheduler "${LR_SCHEDULER}"
            --critic.value_clip 0.5
        )
    fi

    DATA_ARGS=(
        --data.prompt_dataset "${TRAIN_DATA}"
        --data.input_key prompt
        --data.label_key label
    )

    EVAL_ARGS=(
        --eval.dataset "${EVAL_DATA}"
        --eval.steps "${EVAL_STEPS}"
        --eval.temperature 0.6
        --eval.n_samples_per_prompt 1
    )

    ROLLOUT_ARGS=(
        --rollout.batch_size 512
        --rollout.micro_batch_size "${MICRO_ROLLOUT_BATCH}"
        --rollout.max_new_tokens 2048
        --data.max_len 3072
        --rollout.temperature 1.0
        --rollout.top_p 1.0
    )

    TRAIN_ARGS=(
        --train.num_episodes "${NUM_EPISODES}"
        --train.micro_batch_size "${MICRO_TRAIN_BATCH}"
        --train.max_epochs 1
        --train.seed "${SEED}"
        --actor.adam.lr 1e-6
        --actor.lr_scheduler "${LR_SCHEDULER}"
    )

    CLIP_ARGS=(
        --actor.eps_clip_low_high 0.2 0.28
        --actor.dual_clip 3.0
    )
}

# geo3k_recipe critic|no_critic: table7_args on Geometry3K: 200 steps over the first 2048 training
# rows, one image per prompt through the model's chat template; FREEZE_VISION=1 freezes the
# vision towers (actor's, and critic's with a critic).
# shellcheck disable=SC2034  # the arrays are used by the sourcing script
geo3k_recipe() {
    NUM_EPISODES=$(sapo_episodes 200 2048 512)  # 200 steps
    table7_args "$1"
    DATA_ARGS+=(
        --data.image_key images
        --data.max_images_per_prompt 1
        --data.apply_chat_template
        --data.max_samples 2048
    )
    if [[ "${FREEZE_VISION}" == 1 ]]; then
        MODEL_ARGS+=(--actor.freeze_visual_encoder)
        if [[ "$1" == critic ]]; then
            CRITIC_ARGS+=(--critic.freeze_visual_encoder)
        fi
    fi
}
