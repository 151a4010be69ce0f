"""`python -m openrlhf_sapo.cli.train_ppo_ray`: OpenRLHF's PPO launcher plus SAPO.

Every flag of `python -m openrlhf.cli.train_ppo_ray` (openrlhf 0.11.2) works unchanged, because
the parser IS upstream's, compiled from its own `__main__` block (cli/upstream_main.py).

On top of that parser this module adds `sapo` to `--algo.advantage.estimator`, the SAPO flags
(`--algo.sapo.*`), VC-PPO's `--algo.advantage.critic_lambd`, `--vllm.pipeline_parallel_size`
and `--dry-run`, and checks (cli/checks.py; `parser.error`, exit status 2) before upstream's validation. SAPO
needs a critic, which upstream drops for every estimator but gae, so upstream's validation runs
with the estimator set to gae when it is sapo (the critic path is defaulted exactly as for gae).

`main()` then calls `openrlhf_sapo.patches.install_for_training(args)` and upstream's
`train(args)`; with `--dry-run` it prints the resolved configuration as JSON instead and starts
nothing (no Ray, no model, not even an import of torch).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

from openrlhf_sapo import OPENRLHF_VERSION, upstream
from openrlhf_sapo.cli.checks import (  # noqa: F401  (check_* and the recipe are part of this CLI's API)
    SAPO_VALIDATES_AS,
    ConfigError,
    apply_sapo_recipe,
    check_after_upstream,
    check_before_upstream,
    explicit_dests,
)
from openrlhf_sapo.cli.upstream_main import (  # noqa: F401
    UPSTREAM_MODULE,
    UpstreamMain,
    extract_upstream_main,
    upstream_hierarchize,
    upstream_main,
)
from openrlhf_sapo.config import (
    RATIOS,
    SAPO_DEFAULTS,
    SAPO_ESTIMATOR,
    SEGMENTERS,
    SOFT_ADAPTIVE,
    SOFT_ADAPTIVE_TAUS,
    VALUE_AT,
    segmenter_flags,
)

ESTIMATOR_DEST = "algo.advantage.estimator"
POLICY_LOSS_DEST = "actor.policy_loss_type"
POLICY_LOSS_HELP_SUFFIX = (
    "soft_adaptive: Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347; verl and TRL call it sapo), a "
    "baseline; this project's SAPO is --algo.advantage.estimator sapo"
)
# Estimators allowed a critic on a VLM. OpenRLHF refuses a critic for VLMs ("VLM training does not
# support critic model") because its critic is text-only; this CLI always installs openrlhf_sapo's
# VLM critic (models/vlm_critic.py), so the refusal is lifted for the critic-based estimators (packing,
# upstream's other VLM assertion, is checked here instead).
VLM_CRITIC_ESTIMATORS = ("gae", SAPO_ESTIMATOR)

SAPO_GROUP = "SAPO (openrlhf_sapo)"
SAPO_GROUP_DESCRIPTION = (
    "Segment-Aligned Policy Optimization. The --algo.sapo.* flags take effect only with "
    "--algo.advantage.estimator sapo; with any other estimator they are carried in the configuration "
    "(still checked) and have no effect. --algo.advantage.critic_lambd applies to the critic of gae and "
    "sapo; --vllm.pipeline_parallel_size and --dry-run apply to every estimator."
)
ESTIMATOR_HELP_SUFFIX = (
    "; sapo (openrlhf_sapo: segment-level GAE with a critic, segment importance ratios; see --algo.sapo.* "
    "and SAPO_SPEC.md)"
)


@dataclass(frozen=True)
class _Flag:
    option: str
    kwargs: dict


# Every flag this module adds, in --help order. Dest names keep OpenRLHF's dots so that
# `hierarchize` nests them (args.algo.sapo.topk_percent).
ADDED_FLAGS = (
    _Flag("--algo.sapo.segmenter", dict(type=str, default=SAPO_DEFAULTS["segmenter"], choices=tuple(SEGMENTERS),
          help="Where responses are cut into segments: " + "; ".join(
              f"{name} ({spec.help})" for name, spec in SEGMENTERS.items()) + ".")),
    # one flag per segmenter option, from its registry row (openrlhf_sapo.config.SEGMENTERS)
    *(_Flag(f"--algo.sapo.{flag}", dict(type=option.type, default=option.default,
            help=f"{name} segmenter: {option.help}".replace("%", "%%")))
      for flag, (name, option) in segmenter_flags().items()),
    _Flag("--algo.sapo.allow_small_topk", dict(action="store_true", default=False,
          help="Accept --algo.sapo.topk_percent in (0, 1] as a percentage below 1%%. Without it such a value is "
          "refused: the authors' release reads top-k values <= 1 as fractions (0.3 = 30%%), and this flag is a "
          "percentage (30 = 30%%).")),
    _Flag("--algo.sapo.value_at", dict(type=str, default=SAPO_DEFAULTS["value_at"], choices=VALUE_AT,
          help="Where a segment's value is read: end (its last token, the authors' release) or start (its "
          "first token, the paper's state s_m).")),
    _Flag("--algo.sapo.ratio", dict(type=str, default=SAPO_DEFAULTS["ratio"], choices=RATIOS,
          help="Actor importance ratio: segment (geometric mean over the segment, SAPO) or token (per-token "
          "ratio with segment advantages: the paper's naive-IS ablation).")),
    _Flag("--algo.sapo.adv_clip", dict(type=float, default=SAPO_DEFAULTS["adv_clip"],
          help="Clamp whitened segment advantages to [-c, c] (the release uses 5); 0 disables the clamp.")),
    _Flag("--actor.soft_adaptive_tau_pos", dict(type=float, default=SOFT_ADAPTIVE_TAUS[0],
          help="--actor.policy_loss_type soft_adaptive (Qwen's Soft Adaptive Policy Optimization, a baseline; not "
          "this project's SAPO): gate temperature for positive advantages (the paper: 1.0).")),
    _Flag("--actor.soft_adaptive_tau_neg", dict(type=float, default=SOFT_ADAPTIVE_TAUS[1],
          help="--actor.policy_loss_type soft_adaptive: gate temperature for negative advantages (the paper: 1.05; "
          "larger damps off-policy negative updates faster).")),
    _Flag("--algo.advantage.critic_lambd", dict(type=float, default=None,
          help="VC-PPO decoupled lambda for gae and sapo: the critic's returns use this lambda, the actor's "
          "advantages --algo.advantage.lambd. Default: the same as --algo.advantage.lambd.")),
    _Flag("--critic.freeze_visual_encoder", dict(action="store_true", default=False,
          help="VLM critic: freeze its vision tower (as --actor.freeze_visual_encoder does for the actor).")),
    _Flag("--vllm.pipeline_parallel_size", dict(type=int, default=1,
          help="pipeline parallel size of each vLLM engine; an engine then uses --vllm.tensor_parallel_size * "
          "--vllm.pipeline_parallel_size GPUs.")),
    _Flag("--vllm.check_weight_sync", dict(action="store_true", default=False,
          help="After every weight sync into vLLM, check that each engine worker loaded exactly the actor's weights "
          "(float64 sums of every tensor; a mismatch stops the run). Costs one more gather of the weights per sync. "
          "Only on CPU (SAPO's gloo sync) for now.")),
    _Flag("--logger.policy_entropy", dict(action="store_true", default=False,
          help="Log the rollout policy's mean entropy (policy_entropy) for every estimator: one more pass over the "
          "experience forward's full-vocabulary logits (make bench measures it). SAPO's entropy segmenter computes "
          "the entropy anyway and always logs it.")),
    _Flag("--dry-run", dict(action="store_true", default=False,
          help="Parse and validate everything, print the resolved (nested, validated) configuration as JSON "
          "to stdout and exit 0, without starting Ray or loading a model.")),
)
ADDED_DESTS = tuple(flag.option[2:].replace("-", "_") for flag in ADDED_FLAGS)


# ---------------------------------------------------------------- parser


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    for action in parser._actions:
        if action.dest == dest:
            return action
    raise upstream.UpstreamMismatch(f"OpenRLHF's train_ppo_ray parser has no `--{dest}`; openrlhf_sapo expects "
                                f"openrlhf=={OPENRLHF_VERSION}")


def _extend_choices(parser: argparse.ArgumentParser, dest: str, choice: str, help_suffix: str) -> None:
    """Add `choice` to one of upstream's flags with choices (its help says what the choice is)."""
    action = _action(parser, dest)
    if not action.choices or choice in action.choices:
        raise upstream.UpstreamMismatch(f"OpenRLHF's --{dest} choices are {action.choices}; openrlhf_sapo expects a "
                                        f"list without '{choice}' to extend")
    action.choices = [*action.choices, choice]
    action.help = (action.help or "") + help_suffix


def build_parser() -> argparse.ArgumentParser:
    """Upstream's parser (built by its own code) with SAPO's additions."""
    parser = upstream_main().build_parser()
    clashes = sorted({a.dest for a in parser._actions} & set(ADDED_DESTS))
    if clashes:
        raise upstream.UpstreamMismatch(f"OpenRLHF's parser now defines {clashes} itself; openrlhf_sapo adds these "
                                    "flags: remove them from ADDED_FLAGS in openrlhf_sapo/cli/train_ppo_ray.py")
    _extend_choices(parser, ESTIMATOR_DEST, SAPO_ESTIMATOR, ESTIMATOR_HELP_SUFFIX)
    _extend_choices(parser, POLICY_LOSS_DEST, SOFT_ADAPTIVE, POLICY_LOSS_HELP_SUFFIX)
    parser.prog = "python -m openrlhf_sapo.cli.train_ppo_ray"
    parser.description = (
        "OpenRLHF's PPO launcher (python -m openrlhf.cli.train_ppo_ray, every flag unchanged) with SAPO: "
        "--algo.advantage.estimator sapo. " + SAPO_GROUP_DESCRIPTION
    )
    group = parser.add_argument_group(SAPO_GROUP, SAPO_GROUP_DESCRIPTION)
    for flag in ADDED_FLAGS:
        group.add_argument(flag.option, **flag.kwargs)
    parser.error = functools.partial(concise_error, parser)
    return parser


def concise_error(parser: argparse.ArgumentParser, message: str) -> None:
    """A flag error as its message and a pointer to --help (argparse would print a 160-line usage first)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n(`{parser.prog} --help` lists every flag)\n")


def report_problems(parser: argparse.ArgumentParser, problems: Sequence[str]) -> None:
    """Every problem preflight found, one line each; exit status 2 (as a flag error)."""
    if problems:
        listed = "".join(f"\n  - {p}" for p in problems)
        parser.error(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} found before starting:{listed}")


@contextlib.contextmanager
def _swapped(namespace: SimpleNamespace, name: str, value):
    old = getattr(namespace, name)
    setattr(namespace, name, value)
    try:
        yield
    finally:
        # restore unless upstream itself changed the value meanwhile
        if getattr(namespace, name) == value:
            setattr(namespace, name, old)


def _assertion_message(err: AssertionError) -> str:
    message = str(err)
    frames = traceback.extract_tb(err.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
    if not message and frames:
        message = f"assertion `{frames[-1].line}` failed"
    return f"OpenRLHF's check failed{where}: {message}"


def validate(args: SimpleNamespace, quiet_stdout: bool = False) -> SimpleNamespace:
    """Ours, then upstream's validation (in place). Raises ConfigError with a message naming the fix."""
    check_before_upstream(args)
    estimator = args.algo.advantage.estimator
    with contextlib.ExitStack() as stack:
        if quiet_stdout:  # upstream prints its warnings to stdout; keep --dry-run's stdout pure JSON
            stack.enter_context(contextlib.redirect_stdout(sys.stderr))
        if estimator == SAPO_ESTIMATOR:
            stack.enter_context(_swapped(args.algo.advantage, "estimator", SAPO_VALIDATES_AS))
        if estimator in VLM_CRITIC_ESTIMATORS and args.data.max_images_per_prompt > 0:
            stack.enter_context(_swapped(args.data, "max_images_per_prompt", 0))
        try:
            upstream_main().validate(args)
        except AssertionError as err:
            raise ConfigError(_assertion_message(err)) from err
    check_after_upstream(args)
    return args


def parse_args(argv: Optional[Sequence[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None,
               adapt: Optional[Callable[[SimpleNamespace], list]] = None,
               run_preflight: bool = True) -> SimpleNamespace:
    """Parse, hierarchize and validate like upstream's `__main__`, then `preflight` (datasets, steps, run
    directory; `run_preflight=False` leaves it to the caller); errors exit with status 2 (parser.error).
    `parser`: `build_parser()` with more flags added (the single-process CLI's). `adapt(args)` changes
    options before validation (the CPU mode's) and returns what it changed, printed to stderr."""
    parser = parser or build_parser()
    flat = parser.parse_args(argv)
    args = upstream_hierarchize()(flat)
    for note in apply_sapo_recipe(args, explicit_dests(parser, argv)):
        print(f"[openrlhf_sapo] SAPO recipe: {note}", file=sys.stderr, flush=True)
    for note in (adapt(args) if adapt is not None and not args.dry_run else []):
        print(f"[openrlhf_sapo] CPU mode (no CUDA device): {note}", file=sys.stderr, flush=True)
    try:
        validate(args, quiet_stdout=args.dry_run)
    except ConfigError as err:
        parser.error(str(err))
    if run_preflight:
        from openrlhf_sapo.cli.preflight import preflight

        report_problems(parser, preflight(args))
    return args


def to_jsonable(value):
    """Nested dicts / lists of JSON values; anything else (inf, objects) as str."""
    if isinstance(value, SimpleNamespace):
        value = vars(value)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _cpu_mode_adaptations(args: SimpleNamespace) -> list:
    """The CPU mode's option changes (utils/cpu_compat.py), on a machine without CUDA only; before
    upstream's validation, which refuses some CUDA-only combinations (async with vLLM sleep)."""
    from openrlhf_sapo.utils import cpu_compat

    upstream.check_openrlhf_version()
    return [] if cpu_compat.has_cuda() else cpu_compat.adapt_ray_args_for_cpu(args)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv, adapt=_cpu_mode_adaptations)
    if args.dry_run:
        print(json.dumps(to_jsonable(args), indent=2, sort_keys=True))
        return
    upstream_main().use_modelscope(args)
    from openrlhf_sapo.patches import install_for_training

    for note in install_for_training(args, ray_driver=True):
        print(f"[openrlhf_sapo] CPU mode (no CUDA device): {note}", flush=True)
    upstream.upstream(UPSTREAM_MODULE, "train")(args)


if __name__ == "__main__":
    main()
