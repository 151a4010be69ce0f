"""SAPO's checks of a parsed configuration (before and after upstream's validation), and SAPO's recipe
for the upstream options a SAPO run did not set (config.SAPO_RECIPE, SAPO_SPEC.md sections 3 and 6)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace
from typing import Optional, Sequence

from openrlhf_sapo.config import SOFT_ADAPTIVE, SAPO_ESTIMATOR, SAPO_RECIPE, SAPO_RECIPE_OVERRIDDEN_BY, segmenter_flags

# The estimator whose upstream validation (critic defaulting, checks) SAPO runs under.
SAPO_VALIDATES_AS = "gae"

class ConfigError(ValueError):
    """An invalid combination of flags; the CLI turns it into `parser.error` (exit status 2)."""


def _check_unit(flag: str, value: Optional[float]) -> None:
    if value is not None and not (0.0 <= value <= 1.0):
        raise ConfigError(f"{flag} must be in [0, 1], got {value}: it is a discount / GAE factor (the paper uses "
                          "gamma 1.0 and lambda 0.99 for SAPO)")


def check_before_upstream(args: SimpleNamespace) -> None:
    """openrlhf_sapo's checks on hierarchized args, before upstream's validation mutates them."""
    adv, sapo = args.algo.advantage, args.algo.sapo
    estimator = adv.estimator

    if args.actor.policy_loss_type == SOFT_ADAPTIVE:
        taus = (args.actor.soft_adaptive_tau_pos, args.actor.soft_adaptive_tau_neg)
        if not all(t > 0 for t in taus):
            raise ConfigError(f"--actor.soft_adaptive_tau_pos / _neg must be > 0, got {taus[0]} / {taus[1]} (the paper "
                              "uses 1.0 / 1.05)")
        if args.algo.advantage.is_correction_level != "off":
            raise ConfigError("--actor.policy_loss_type soft_adaptive does not implement vLLM IS correction; drop "
                              "--algo.advantage.is_correction_level (or use --actor.policy_loss_type ppo)")
    if estimator == SAPO_ESTIMATOR and args.actor.policy_loss_type == SOFT_ADAPTIVE:
        raise ConfigError("--actor.policy_loss_type soft_adaptive is Qwen's Soft Adaptive Policy Optimization, a "
                          "different algorithm from this project's SAPO (Segment-Aligned, --algo.advantage.estimator "
                          "sapo), and cannot be combined with it: run one or the other")
    if estimator == SAPO_ESTIMATOR and args.actor.policy_loss_type == "gspo":
        raise ConfigError("--actor.policy_loss_type gspo cannot be combined with --algo.advantage.estimator sapo: "
                          "SAPO has its own segment-level ratio; drop --actor.policy_loss_type (or use ppo) and choose "
                          "the ratio with --algo.sapo.ratio {segment,token}")
    for flag, (_, option) in segmenter_flags().items():
        value = getattr(sapo, flag)
        if not option.valid(value):
            raise ConfigError(option.error.format(flag=f"--algo.sapo.{flag}", value=value))
    if sapo.topk_percent <= 1.0 and not sapo.allow_small_topk:
        raise ConfigError(f"--algo.sapo.topk_percent {sapo.topk_percent:g} would end a segment at {sapo.topk_percent:g}% "
                          "of the tokens (almost one segment per response). It is a percentage here, while the authors' "
                          f"release reads values <= 1 as fractions: for {100 * sapo.topk_percent:g}% pass "
                          f"--algo.sapo.topk_percent {100 * sapo.topk_percent:g}; to really use {sapo.topk_percent:g}% add "
                          "--algo.sapo.allow_small_topk")
    if not (sapo.adv_clip >= 0.0):
        raise ConfigError(f"--algo.sapo.adv_clip must be >= 0, got {sapo.adv_clip}: advantages are clamped to "
                          "[-c, c]; pass 0 to disable the clamp (the release uses 5)")

    _check_unit("--algo.advantage.lambd", adv.lambd)
    _check_unit("--algo.advantage.critic_lambd", adv.critic_lambd)
    _check_unit("--algo.advantage.gamma", adv.gamma)

    # Upstream defaults the critic of gae to the first reward model, or with a remote reward (or an
    # agent) to the actor; with neither it crashes on None.split(",").
    if (estimator in (SAPO_VALIDATES_AS, SAPO_ESTIMATOR) and args.critic.model_name_or_path is None
            and not args.reward.remote_url and not args.train.agent_func_path and not args.reward.model_name_or_path):
        raise ConfigError(f"--algo.advantage.estimator {estimator} needs a critic, and none can be derived: pass "
                          "--critic.model_name_or_path, or --reward.model_name_or_path (the critic then defaults to "
                          "the reward model), or --reward.remote_url / --train.agent_func_path with "
                          "--actor.model_name_or_path (the critic then defaults to the actor)")

    # Upstream options a run depends on that upstream checks late (in a worker, after the models load) or never.
    ranges = (
        ("--actor.dual_clip", args.actor.dual_clip, lambda v: v is None or v > 1.0,
         "must be > 1 (a cap of c * A on the loss of negative-advantage tokens; the release uses 3)"),
        ("--actor.eps_clip", args.actor.eps_clip, lambda v: v > 0.0, "must be > 0 (0.2)"),
        ("--actor.eps_clip_low_high", args.actor.eps_clip_low_high,
         lambda v: v is None or (v[0] > 0.0 and v[1] > 0.0), "must be two values > 0 (0.2 0.28)"),
        ("--critic.value_clip", args.critic.value_clip, lambda v: v is None or v > 0.0, "must be > 0 (0.5)"),
        ("--rollout.temperature", args.rollout.temperature, lambda v: v > 0.0, "must be > 0"),
        ("--rollout.top_p", args.rollout.top_p, lambda v: 0.0 < v <= 1.0, "must be in (0, 1]"),
        ("--rollout.n_samples_per_prompt", args.rollout.n_samples_per_prompt, lambda v: v >= 1, "must be >= 1"),
        ("--algo.kl.init_coef", args.algo.kl.init_coef, lambda v: v >= 0.0, "must be >= 0 (0 drops the KL term)"),
        ("--actor.adam.lr", args.actor.adam.lr, lambda v: v > 0.0, "must be > 0"),
        ("--critic.adam.lr", args.critic.adam.lr, lambda v: v > 0.0, "must be > 0"),
    )
    for flag, value, ok, rule in ranges:
        if not ok(value):
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{flag} {rule}, got {shown}")

    # --rollout.max_new_tokens None: upstream generates up to max_len - prompt length per sample
    for flag, value in (("--rollout.max_new_tokens", args.rollout.max_new_tokens), ("--data.max_len", args.data.max_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 token, got {value}")
    if args.rollout.max_new_tokens is not None and args.data.max_len <= args.rollout.max_new_tokens:
        raise ConfigError(f"--data.max_len ({args.data.max_len}) is prompt + response, so it must exceed "
                          f"--rollout.max_new_tokens ({args.rollout.max_new_tokens}) to leave room for the prompt")

    # Upstream refuses --ds.packing_samples for VLMs, but turns packing on itself, later in the
    # same validation and with only a warning, for ring attention and dynamic batching. A VLM is
    # known by --data.max_images_per_prompt or, for a local model, by its config.
    from openrlhf_sapo.utils.vlm_utils import is_vlm_checkpoint

    images = args.data.max_images_per_prompt
    if images > 0 or is_vlm_checkpoint(args.actor.model_name_or_path):
        packing = [flag for flag, on in (
            ("--ds.packing_samples", args.ds.packing_samples),
            (f"--ds.ring_attn_size {args.ds.ring_attn_size}", args.ds.ring_attn_size > 1),
            ("--train.dynamic_batch_enable", args.train.dynamic_batch_enable),
        ) if on]
        if packing:
            why = f"--data.max_images_per_prompt {images}" if images > 0 else f"{args.actor.model_name_or_path} is a VLM"
            raise ConfigError(f"VLM training ({why}) cannot use sample packing, which "
                              f"{', '.join(packing)} {'turns' if len(packing) == 1 else 'turn'} on: packing breaks the "
                              "alignment of image tokens with pixel_values (and M-RoPE position ids). Remove "
                              f"{' and '.join(flag.split()[0] for flag in packing)}, or train text-only "
                              "(--data.max_images_per_prompt 0)")

    engines = args.vllm.num_engines
    packing_on = args.ds.packing_samples or args.ds.ring_attn_size > 1 or args.train.dynamic_batch_enable
    if packing_on and engines is None:  # upstream: `None > 0` -> TypeError
        raise ConfigError("--ds.packing_samples (also turned on by --ds.ring_attn_size > 1 and "
                          "--train.dynamic_batch_enable) is only supported with vLLM: set --vllm.num_engines >= 1")

    pp, tp = args.vllm.pipeline_parallel_size, args.vllm.tensor_parallel_size
    if pp < 1:
        raise ConfigError(f"--vllm.pipeline_parallel_size must be >= 1, got {pp}")
    if pp > 1 and not engines:
        raise ConfigError(f"--vllm.pipeline_parallel_size {pp} needs vLLM engines, but --vllm.num_engines is "
                          f"{engines}: set --vllm.num_engines >= 1 or drop --vllm.pipeline_parallel_size")
    if engines and args.train.colocate_all and not args.train.async_enable:
        # colocated (sync) engines share the actor's placement group, one GPU bundle per actor GPU
        actor_gpus = args.actor.num_nodes * args.actor.num_gpus_per_node
        per_engine = tp * pp
        if actor_gpus != engines * per_engine:
            raise ConfigError(
                f"--train.colocate_all puts the vLLM engines on the actor's GPUs, so --actor.num_nodes * "
                f"--actor.num_gpus_per_node ({args.actor.num_nodes} * {args.actor.num_gpus_per_node} = {actor_gpus}) "
                f"must equal --vllm.num_engines * GPUs per engine, where an engine uses --vllm.tensor_parallel_size "
                f"* --vllm.pipeline_parallel_size = {tp} * {pp} = {per_engine} GPUs: {engines} * {per_engine} = "
                f"{engines * per_engine}. Change --vllm.num_engines (to {actor_gpus / per_engine:g}) or the sizes")


def check_after_upstream(args: SimpleNamespace) -> None:
    if args.algo.advantage.estimator == SAPO_ESTIMATOR and not args.critic.model_name_or_path:
        raise ConfigError(
            "--algo.advantage.estimator sapo needs a critic, but none resolved: with --reward.remote_url or "
            "--train.agent_func_path the critic defaults to --actor.model_name_or_path "
            f"({args.actor.model_name_or_path!r}); pass --critic.model_name_or_path or --actor.model_name_or_path")


# ---------------------------------------------------------------- SAPO's recipe for unset options


_UNSET = object()


def explicit_dests(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> set:
    """The dests the command line set (argparse fills in a default only where the namespace has no value)."""
    probe = argparse.Namespace(**{a.dest: _UNSET for a in parser._actions if a.dest != argparse.SUPPRESS})
    parser.parse_args(argv, namespace=probe)
    return {dest for dest, value in vars(probe).items() if value is not _UNSET}


def _dotted(args: SimpleNamespace, dest: str):
    owner, _, name = dest.rpartition(".")
    for part in owner.split("."):
        args = getattr(args, part)
    return args, name


def apply_sapo_recipe(args: SimpleNamespace, given: set) -> list:
    """For --algo.advantage.estimator sapo: each SAPO_RECIPE option the command line did not set takes the
    recipe's value. Records every recipe and --algo.sapo.* option's source in `args.algo.sapo.sources`
    (shown by --dry-run) and returns one note per value taken from the recipe."""
    if args.algo.advantage.estimator != SAPO_ESTIMATOR:
        return []
    sources, notes = {}, []
    for dest, (value, why) in SAPO_RECIPE.items():
        owner, name = _dotted(args, dest)
        overridden = [d for d in SAPO_RECIPE_OVERRIDDEN_BY.get(dest, ()) if d in given]
        if dest in given:
            sources[dest] = "command line"
        elif overridden:
            sources[dest] = f"OpenRLHF default (kept: --{overridden[0]} was set)"
        elif getattr(owner, name) == value:
            sources[dest] = f"OpenRLHF default (= SAPO recipe: {why})"
        else:
            setattr(owner, name, list(value) if isinstance(value, list) else value)
            sources[dest] = f"SAPO recipe: {why}"
            shown = " ".join(str(v) for v in value) if isinstance(value, list) else value
            notes.append(f"--{dest} {shown} (not set; {why})")
    for name in vars(args.algo.sapo):
        dest = f"algo.sapo.{name}"
        sources[dest] = "command line" if dest in given else "SAPO default"
    args.algo.sapo.sources = sources
    return notes
