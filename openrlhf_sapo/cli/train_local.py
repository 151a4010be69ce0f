"""`python -m openrlhf_sapo.cli.train_local`: PPO / GRPO / GSPO / SAPO in ONE process, on CPU or one GPU.

The flags are those of `python -m openrlhf_sapo.cli.train_ppo_ray` (upstream's parser, validation
and SAPO's additions), plus `--resume` and a few `--local.*` options. What runs is the Ray path's
code, minus Ray and vLLM:

    upstream PPOTrainer (as the class inside its Ray actor)       trainer/local/ppo_trainer.py
      SamplesGenerator -> agent executor (tokens, VLM, reward)   upstream, unchanged
        -> HFRolloutEngine (batched HF generate)                 trainer/local/hf_engine.py (replaces vLLM)
      SegmentExperienceMaker -> actor / critic / ref workers     SAPO's + upstream's, unchanged
      workers: DeepSpeed (ZeRO 0-3) actor, critic, reference     upstream's init/fit/save/checkpoint
    Ray actor groups and object refs                             trainer/local/launcher.py (in-process)

so the estimators, losses, KL (in the reward or as a loss), mini-batches and epochs, logging
(tensorboard, wandb), evaluation, checkpoints (`--ckpt.save_steps`) and resume (`--resume` =
`--ckpt.load_enable`) are upstream's and SAPO's own. On CPU, DeepSpeed runs with gloo after
`cpu_compat.patch_distributed_for_cpu()` (undone at the end); on a GPU nothing is patched.

Why DeepSpeed here rather than a plain torch loop: the backend is the project's end-to-end test
of the GPU code path, and with world size 1 DeepSpeed costs little (its CPU ops are compiled once,
about 1-2 min, then cached).
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import socket
import sys
from typing import Optional, Sequence

from openrlhf_sapo.cli import train_ppo_ray

LOCAL_GROUP = "single-process backend (openrlhf_sapo.cli.train_local)"
ROLES = ("actor", "critic", "ref", "reward")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def build_parser() -> argparse.ArgumentParser:
    parser = train_ppo_ray.build_parser()
    parser.prog = "python -m openrlhf_sapo.cli.train_local"
    parser.description = (
        "PPO / GRPO / GSPO / SAPO in one process (CPU or one GPU): the flags of openrlhf_sapo.cli.train_ppo_ray "
        "(OpenRLHF's, plus SAPO's); Hugging Face generate replaces vLLM and in-process workers replace Ray."
    )
    # One process: every model group is world size 1 (upstream's defaults size the Ray cluster).
    parser.set_defaults(**{f"{role}.{what}": 1 for role in ROLES for what in ("num_nodes", "num_gpus_per_node")})
    # The HF engine is the run's one rollout engine (upstream's checks count vLLM engines).
    parser.set_defaults(**{"vllm.num_engines": 1})
    # fp32 training on CPU (cpu_compat makes upstream's model builders accept it): faster than bf16 on
    # most CPUs, and the demo's numbers then do not depend on the CPU's bf16 kernels.
    dtype_flag = next(a for a in parser._actions if "--ds.param_dtype" in a.option_strings)
    dtype_flag.choices = [*dtype_flag.choices, "fp32"]
    dtype_flag.help = f"{dtype_flag.help} (fp32: single-process backend on CPU only)"
    group = parser.add_argument_group(LOCAL_GROUP)
    group.add_argument("--resume", action="store_true", default=False,
                       help="resume from the last checkpoint under --ckpt.path (= --ckpt.load_enable)")
    group.add_argument("--local.device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="where the models run (auto: cuda if available)")
    group.add_argument("--local.rollout_dtype", default="auto", choices=("auto", *DTYPES),
                       help="dtype of the rollout engine's copy of the policy (auto: fp32 on CPU, "
                            "--ds.param_dtype on a GPU)")
    group.add_argument("--local.metrics_jsonl", default=None,
                       help="append every logged step and evaluation to this JSONL file")
    group.add_argument("--local.eval_at_start", action="store_true", default=False,
                       help="evaluate before the first step (not when resuming)")
    group.add_argument("--local.rollout_batch_limit", type=int, default=512,
                       help="most sequences per HF generate call")
    return parser


def check_local(args) -> None:
    """What one process cannot do, refused with the fix."""
    problems = []
    for role in ROLES:
        role_args = getattr(args, role)
        if role_args.num_nodes * role_args.num_gpus_per_node != 1:
            problems.append(f"--{role}.num_nodes / --{role}.num_gpus_per_node: one process is world size 1 "
                            "(leave them at 1, or use openrlhf_sapo.cli.train_ppo_ray for several GPUs)")
    if args.ds.ring_attn_size != 1 or args.ds.tensor_parallel_size != 1:
        problems.append("ring attention / DeepSpeed tensor parallelism need several processes: "
                        "use --ds.ring_attn_size 1 --ds.tensor_parallel_size 1")
    if args.train.async_enable:
        problems.append("--train.async_enable overlaps rollout and training in separate Ray actors: drop it")
    if args.ds.lora.rank:
        problems.append("LoRA weight sync into the rollout engine is not supported locally: drop --ds.lora.rank")
    if args.ds.enable_sleep or args.vllm.enable_sleep:
        problems.append("sleep modes free GPU memory between Ray actors; drop --ds.enable_sleep / --vllm.enable_sleep")
    if args.ds.packing_samples and not _cuda(args):
        problems.append("--ds.packing_samples needs flash-attention on a GPU (on CPU its log-probs are wrong)")
    if args.vllm.num_engines != 1 or args.vllm.tensor_parallel_size != 1:
        problems.append("the single-process backend has exactly one rollout engine (Hugging Face generate): "
                        "leave --vllm.num_engines and --vllm.tensor_parallel_size at 1")
    if args.ds.param_dtype == "fp32" and _cuda(args):
        problems.append("--ds.param_dtype fp32 is for CPU runs; on a GPU use bf16 (upstream's default)")
    if args.local.device == "cuda" and not _cuda_available():
        problems.append("--local.device cuda but torch sees no GPU")
    if problems:
        raise train_ppo_ray.ConfigError("; ".join(problems))


def parse_args(argv: Optional[Sequence[str]] = None):
    from openrlhf_sapo.cli.preflight import preflight

    parser = build_parser()
    args = train_ppo_ray.parse_args(argv, parser=parser, run_preflight=False)
    if args.resume:
        args.ckpt.load_enable = True
    try:
        check_local(args)
    except train_ppo_ray.ConfigError as err:
        parser.error(str(err))
    problems = preflight(args, resume_flag="--resume")
    metrics = args.local.metrics_jsonl
    if metrics and os.path.isfile(metrics) and os.path.getsize(metrics) and not args.ckpt.load_enable:
        problems.append(f"--local.metrics_jsonl: {metrics} already holds a run's metrics: pass --resume to continue "
                        "that run, or choose another file (or remove it) to start a new one")
    train_ppo_ray.report_problems(parser, problems)
    return args


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda(args) -> bool:
    return args.local.device == "cuda" or (args.local.device == "auto" and _cuda_available())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_rollout_engine(args, tokenizer, store):
    """The HF rollout engine with its own copy of the policy, and upstream's agent executor."""
    import torch

    from openrlhf_sapo import upstream
    from openrlhf_sapo.trainer.local.hf_engine import HFRolloutEngine

    path = args.actor.model_name_or_path
    cuda = _cuda(args)
    dtype = args.local.rollout_dtype
    dtype = ("fp32" if not cuda else args.ds.param_dtype) if dtype == "auto" else dtype
    processor = tokenizer if hasattr(tokenizer, "image_processor") else None
    if upstream.upstream("openrlhf.utils.utils", "is_vlm_model")(path):
        from transformers import AutoModelForImageTextToText as auto_cls
    else:
        from transformers import AutoModelForCausalLM as auto_cls
    model = auto_cls.from_pretrained(path, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=True,
                                     attn_implementation="sdpa")
    model.to("cuda" if cuda else "cpu")
    if args.train.agent_func_path:
        executor = upstream.upstream("openrlhf.trainer.ray.vllm_engine", "_load_agent_executor")(args.train.agent_func_path)
    else:
        executor = upstream.upstream("openrlhf.utils.agent", "SingleTurnAgentExecutor")(args.reward.remote_url)
    text_tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    return HFRolloutEngine(model, text_tokenizer, executor, processor=processor,
                           max_batch_size=args.local.rollout_batch_limit)


# DeepSpeed's module-level process-group caches (deepspeed.utils.groups): None or {} until an engine
# is built, then pointing at groups of the process group of that time.
_DEEPSPEED_GROUP_CACHE = re.compile(r"^_[A-Z_]*(GROUP|GROUP_RANKS|WORLD_SIZE|RANK)$|^mpu$|^mesh_device$")


def _reset_deepspeed_groups() -> None:
    """Forget the groups DeepSpeed cached. Called with no process group alive (before and after a
    run), so that engines are built on this run's process group, not on a destroyed one (another
    run, or another DeepSpeed user, earlier in this process: tests, notebooks, the demo)."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if _DEEPSPEED_GROUP_CACHE.match(name):
            setattr(groups, name, {} if isinstance(value, dict) else None)


def train(args) -> dict:
    """The Ray launcher's `train(args)`, in this process. Returns paths and counts of the run."""
    import torch.distributed as dist
    import transformers

    from openrlhf_sapo import patches, upstream
    from openrlhf_sapo.trainer.local.launcher import LocalActorGroup, LocalHandle, LocalObjectStore
    from openrlhf_sapo.utils import cpu_compat

    patches.install_for_training(args)
    from openrlhf_sapo.trainer.local.ppo_actor import LocalPolicyModelActor
    from openrlhf_sapo.trainer.local.ppo_trainer import LocalPPOTrainer
    from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActor

    get_strategy = upstream.upstream("openrlhf.utils", "get_strategy")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; train_local owns it")
    environ = dict(os.environ)
    _reset_deepspeed_groups()
    store = LocalObjectStore()
    port = _free_port()
    patched = cpu_compat.patch_distributed_for_cpu() if not _cuda(args) else False
    try:
        with upstream.local_ray(store):
            def worker(cls):
                # As Ray does: each worker gets its own copy of the arguments and its own strategy.
                w = cls.__new__(cls)
                cls.__init__(w, world_size=1, rank=0, master_addr="127.0.0.1", master_port=port)
                return w, get_strategy(copy.deepcopy(args))

            actor, actor_strategy = worker(LocalPolicyModelActor)
            groups = {"actor": LocalActorGroup(actor, store)}
            ref = critic = reward = None
            if args.algo.kl.init_coef > 0:
                ref = worker(upstream.upstream("openrlhf.trainer.ray.launcher", "ReferenceModelActor").__ray_actor_class__)
                groups["ref"] = LocalActorGroup(ref[0], store)
            if args.critic.model_name_or_path:
                critic = worker(SapoCriticModelActor.__ray_actor_class__)
                groups["critic"] = LocalActorGroup(critic[0], store)
            if not args.reward.remote_url:
                reward = worker(upstream.upstream("openrlhf.trainer.ray.launcher", "RewardModelActor").__ray_actor_class__)
                groups["reward"] = LocalActorGroup(reward[0], store)

            # Upstream's order: the trainer (tokenizer, datasets, max_steps) before the models.
            # Seed first: the prompt loader draws its shuffling seed from torch's global generator
            # when it is built (upstream's trainer actor never seeds it, so its order varies run to run).
            transformers.set_seed(args.train.seed)
            strategy = get_strategy(copy.deepcopy(args))
            get_tokenizer = upstream.upstream("openrlhf.utils.utils", "get_tokenizer")
            tokenizer = get_tokenizer(args.actor.model_name_or_path, None, "left", strategy,
                                      use_fast=not args.data.disable_fast_tokenizer)
            engine = build_rollout_engine(args, tokenizer, store)
            trainer = LocalPPOTrainer(
                args.actor.model_name_or_path, strategy, groups["actor"], groups.get("critic"),
                groups.get("reward"), groups.get("ref"), [LocalHandle(engine, store)],
                metrics_path=args.local.metrics_jsonl, eval_at_start=args.local.eval_at_start,
                rollout_engine=engine,
                do_sample=True, max_len=args.data.max_len, max_new_tokens=args.rollout.max_new_tokens,
                temperature=args.rollout.temperature, top_p=args.rollout.top_p,
            )
            max_steps = trainer.get_max_steps()
            store.get(groups["actor"].async_init_model_from_pretrained(actor_strategy, args.actor.model_name_or_path,
                                                                       max_steps, None))
            actor.rollout_engine = engine
            if ref is not None:
                store.get(groups["ref"].async_init_model_from_pretrained(ref[1], args.actor.model_name_or_path))
            if reward is not None:
                store.get(groups["reward"].async_init_model_from_pretrained(reward[1], args.reward.model_name_or_path))
            if critic is not None:
                store.get(groups["critic"].async_init_model_from_pretrained(critic[1], args.critic.model_name_or_path,
                                                                            max_steps))
            actor.broadcast_to_vllm()  # the engine starts from the actor's weights exactly
            trainer.fit()
            store.get(groups["actor"].async_save_model())
            if critic is not None and args.critic.save_value_network:
                store.get(groups["critic"].async_save_model())
            return {"output_dir": args.ckpt.output_dir, "max_steps": max_steps,
                    "generated_tokens": engine.generated_tokens, "workers": sorted(groups)}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _reset_deepspeed_groups()
        if patched:
            cpu_compat.restore_distributed()
        os.environ.clear()
        os.environ.update(environ)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.dry_run:
        import json

        print(json.dumps(train_ppo_ray.to_jsonable(args), indent=2, sort_keys=True))
        return
    train(args)


if __name__ == "__main__":
    main(sys.argv[1:])
