"""`python -m openrlhf_sapo.cli.train_ppo_ray`: OpenRLHF's PPO launcher plus SAPO.

Every flag of `python -m openrlhf.cli.train_ppo_ray` (openrlhf 0.11.2) works unchanged, because
the parser IS upstream's: OpenRLHF builds its parser, validates the arguments and calls
`train(args)` inside `if __name__ == "__main__":`, with no function to reuse. Instead of copying
those statements, `upstream_main()` reads the installed module's source, checks the structure
this file relies on and compiles three pieces of it, unchanged, as functions:

- `build_parser()`: the statements from `parser = argparse.ArgumentParser()` up to (not
  including) `args = parser.parse_args()`, returning upstream's own parser object;
- `validate(args)`: the statements between `args = hierarchize(args)` and the trailing
  `if args.use_ms:` block (upstream's checks and defaults; it mutates args and uses `assert`);
- `use_modelscope(args)`: that trailing block (patches the hub when --use_ms), run only
  before a real training run, never by --dry-run.

They run with the module's own globals: the top-level imports of the module they reference
(`argparse`, `datetime`), or, if they ever reference anything else, the imported module's
namespace. `assert` statements are compiled with optimize=0, so upstream's checks also hold
under `python -O`. If the source no longer has the expected shape, `UpstreamMismatch` says
what was expected and what was found.

On top of that parser this module adds `sapo` to `--algo.advantage.estimator`, the SAPO flags
(`--algo.sapo.*`), VC-PPO's `--algo.advantage.critic_lambd`, `--vllm.pipeline_parallel_size`
and `--dry-run`, and checks (`parser.error`, exit status 2) before upstream's validation. SAPO
needs a critic, which upstream drops for every estimator but gae, so upstream's validation runs
with the estimator set to gae when it is sapo (the critic path is defaulted exactly as for gae).

`main()` then calls `openrlhf_sapo.patches.install_for_training(args)` and upstream's
`train(args)`; with `--dry-run` it prints the resolved configuration as JSON instead and starts
nothing (no Ray, no model, not even an import of torch).
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import os
import symtable
import sys
import traceback
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Callable, Dict, Iterable, Optional, Sequence

from openrlhf_sapo import OPENRLHF_VERSION, upstream
from openrlhf_sapo.config import SAPO_DEFAULTS, SAPO_RECIPE, SAPO_RECIPE_OVERRIDDEN_BY, SEGMENTERS, segmenter_flags

UPSTREAM_MODULE = "openrlhf.cli.train_ppo_ray"
UPSTREAM_CONFIG_MODULE = "openrlhf.utils.config"

# The anchors of upstream's `__main__` block, as `ast.unparse` prints them.
FIRST_STATEMENT = "parser = argparse.ArgumentParser()"
PARSE_STATEMENT = "args = parser.parse_args()"
HIERARCHIZE_IMPORT = "from openrlhf.utils.config import hierarchize"
HIERARCHIZE_STATEMENT = "args = hierarchize(args)"
USE_MS_TEST = "args.use_ms"
TRAIN_STATEMENT = "train(args)"

ESTIMATOR_DEST = "algo.advantage.estimator"
SAPO_ESTIMATOR = "sapo"
# The estimator whose upstream validation (critic defaulting, checks) SAPO runs under.
SAPO_VALIDATES_AS = "gae"
# Estimators allowed a critic on a VLM. OpenRLHF refuses a critic for VLMs ("VLM training does not
# support critic model") because its critic is text-only; this CLI always installs openrlhf_sapo's
# VLM critic (models/vlm_critic.py), so the refusal is lifted for the critic-based estimators (packing,
# upstream's other VLM assertion, is checked here instead).
VLM_CRITIC_ESTIMATORS = ("gae", SAPO_ESTIMATOR)

VALUE_AT = ("end", "start")
RATIOS = ("segment", "token")

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


# ---------------------------------------------------------------- upstream extraction


@dataclass(frozen=True)
class UpstreamMain:
    """Upstream's `__main__` block, compiled from its source into callables."""

    build_parser: Callable[[], argparse.ArgumentParser]
    validate: Callable[[SimpleNamespace], None]
    use_modelscope: Callable[[SimpleNamespace], None]
    filename: str


def _mismatch(filename: str, what: str) -> upstream.UpstreamMismatch:
    return upstream.UpstreamMismatch(
        f"{filename}: {what}. openrlhf_sapo.cli.train_ppo_ray reuses the `if __name__ == \"__main__\":` block of "
        f"openrlhf=={OPENRLHF_VERSION}'s cli/train_ppo_ray.py and expects: `{FIRST_STATEMENT}` first, "
        f"`{PARSE_STATEMENT}`, then `{HIERARCHIZE_IMPORT}` and `{HIERARCHIZE_STATEMENT}`, the validation, an "
        f"`if {USE_MS_TEST}:` block and `{TRAIN_STATEMENT}` last. Install openrlhf=={OPENRLHF_VERSION}, or "
        "update openrlhf_sapo/cli/train_ppo_ray.py for the new upstream layout."
    )


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) in ('__name__ == "__main__"', "__name__ == '__main__'")


def _index(body: Sequence[ast.stmt], text: str, filename: str) -> int:
    found = [i for i, stmt in enumerate(body) if ast.unparse(stmt) == text]
    if len(found) != 1:
        raise _mismatch(filename, f"the __main__ block has {len(found)} statements `{text}`, expected exactly one")
    return found[0]


def _function(name: str, params: Sequence[str], body: Sequence[ast.stmt], returns: Optional[str]) -> ast.FunctionDef:
    """A function wrapping upstream statements; they keep their line numbers (tracebacks point into upstream)."""
    body = list(body)
    if returns is not None:
        body.append(ast.Return(value=ast.Name(id=returns, ctx=ast.Load())))
    if not body:
        body = [ast.Pass()]
    line = body[0].lineno
    fields = dict(
        name=name,
        args=ast.arguments(posonlyargs=[], args=[ast.arg(arg=p) for p in params], kwonlyargs=[], kw_defaults=[],
                           defaults=[]),
        body=body,
        decorator_list=[],
        returns=None,
        lineno=line,
        col_offset=0,
    )
    if "type_params" in ast.FunctionDef._fields:  # Python >= 3.12
        fields["type_params"] = []
    fn = ast.FunctionDef(**fields)
    for node in ast.walk(fn):  # the synthetic nodes (the return) take the function's line
        if "lineno" in node._attributes and not hasattr(node, "lineno"):
            node.lineno = node.end_lineno = line
            node.col_offset = node.end_col_offset = 0
    return fn


def _free_names(module: ast.Module, filename: str) -> Dict[str, set]:
    """Per function: the global names it reads that are not builtins (what its globals must provide)."""
    table = symtable.symtable(ast.unparse(module), filename, "exec")
    free = {}
    for child in table.get_children():
        names = {s.get_name() for s in child.get_symbols() if s.is_global() and s.is_referenced()}
        free[child.get_name()] = {n for n in names if not hasattr(builtins, n)}
    return free


def _bound_by_import(stmt: ast.stmt) -> set:
    if isinstance(stmt, ast.Import):
        return {alias.asname or alias.name.split(".")[0] for alias in stmt.names}
    if isinstance(stmt, ast.ImportFrom):
        return {alias.asname or alias.name for alias in stmt.names}
    return set()


def _import_upstream_module(name: str = UPSTREAM_MODULE) -> ModuleType:
    upstream.check_openrlhf_version()
    from openrlhf_sapo.utils import cpu_compat

    cpu_compat.apply()
    return importlib.import_module(name)


def _upstream_globals(tree: ast.Module, needed: Iterable[str], filename: str, module_name: str,
                      import_module: Callable[[], ModuleType]) -> dict:
    """The module globals the extracted code reads.

    When each needed name is bound by one of the module's own top-level imports (argparse, datetime
    in 0.11.2), only those import statements run: importing the whole module would import Ray,
    vLLM and DeepSpeed (about 10 s) for a parser. Otherwise the module is imported and its
    namespace used.
    """
    needed = set(needed)
    imports = [stmt for stmt in tree.body if _bound_by_import(stmt) & needed]
    if needed <= set().union(*(_bound_by_import(stmt) for stmt in imports)):
        namespace = {"__name__": module_name, "__file__": filename, "__builtins__": builtins}
        code = compile(ast.Module(body=imports, type_ignores=[]), filename, "exec", dont_inherit=True)
        exec(code, namespace)
        return namespace
    namespace = vars(import_module())
    missing = sorted(needed - set(namespace))
    if missing:
        raise _mismatch(filename, f"the __main__ block uses {missing}, which the module does not define")
    return namespace


def extract_upstream_main(source: str, filename: str = "<openrlhf/cli/train_ppo_ray.py>",
                          module_name: str = UPSTREAM_MODULE,
                          import_module: Optional[Callable[[], ModuleType]] = None) -> UpstreamMain:
    """Compile the parser building, the validation and the --use_ms block of upstream's `__main__`.

    Raises UpstreamMismatch if the source does not have the structure described in the module docstring.
    """
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as err:
        raise _mismatch(filename, f"the source does not parse ({err})") from None
    guards = [node for node in tree.body if _is_main_guard(node)]
    if len(guards) != 1:
        raise _mismatch(filename, f"found {len(guards)} top-level `if __name__ == \"__main__\":` blocks, expected one")
    body = guards[0].body
    first = ast.unparse(body[0]).splitlines()[0]
    if first != FIRST_STATEMENT:
        raise _mismatch(filename, f"the __main__ block starts with `{first}`")
    last = ast.unparse(body[-1]).splitlines()[0]
    if last != TRAIN_STATEMENT:
        raise _mismatch(filename, f"the __main__ block ends with `{last}`, not `{TRAIN_STATEMENT}`")
    parse_at = _index(body, PARSE_STATEMENT, filename)
    hierarchize_at = _index(body, HIERARCHIZE_STATEMENT, filename)
    if hierarchize_at + 1 >= len(body) - 2:
        raise _mismatch(filename, f"no validation statements between `{HIERARCHIZE_STATEMENT}` and the end")
    if hierarchize_at != parse_at + 2 or ast.unparse(body[parse_at + 1]) != HIERARCHIZE_IMPORT:
        found = [ast.unparse(stmt).splitlines()[0] for stmt in body[parse_at + 1:hierarchize_at + 1]]
        raise _mismatch(filename, f"after `{PARSE_STATEMENT}` found {found}")
    use_ms = body[-2]
    if not (isinstance(use_ms, ast.If) and ast.unparse(use_ms.test) == USE_MS_TEST and not use_ms.orelse):
        raise _mismatch(filename, f"the statement before `{TRAIN_STATEMENT}` is "
                        f"`{ast.unparse(use_ms).splitlines()[0]}`, not `if {USE_MS_TEST}:`")
    parser_body, validation_body = body[:parse_at], body[hierarchize_at + 1:-2]

    functions = ast.Module(body=[
        _function("build_parser", [], parser_body, returns="parser"),
        _function("validate", ["args"], validation_body, returns=None),
        _function("use_modelscope", ["args"], [use_ms], returns=None),
    ], type_ignores=[])
    free = _free_names(functions, filename)
    for name, forbidden in (("validate", "parser"), ("use_modelscope", "parser"), ("build_parser", "args")):
        if forbidden in free[name]:
            raise _mismatch(filename, f"the {name.replace('_', ' ')} statements use `{forbidden}`")
    namespace = _upstream_globals(tree, set().union(*free.values()), filename, module_name,
                                  import_module or (lambda: _import_upstream_module(module_name)))
    # optimize=0: upstream's checks are `assert` statements; keep them even under `python -O`.
    code = compile(functions, filename, "exec", dont_inherit=True, optimize=0)
    compiled: dict = {}
    exec(code, namespace, compiled)  # the functions land in `compiled`; their globals are `namespace`
    return UpstreamMain(compiled["build_parser"], compiled["validate"], compiled["use_modelscope"], filename)


def _upstream_source_path(module: str) -> str:
    """The installed file of an openrlhf module, found without importing it (or its packages' heavy __init__)."""
    upstream.check_openrlhf_version()
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise upstream.UpstreamMismatch("openrlhf is not importable; install openrlhf==" + OPENRLHF_VERSION)
    parts = module.split(".")[1:]
    path = os.path.join(list(spec.submodule_search_locations)[0], *parts) + ".py"
    if not os.path.isfile(path):
        raise upstream.UpstreamMismatch(f"{module} is not at {path}; openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION}")
    return path


@functools.lru_cache(maxsize=None)
def upstream_main() -> UpstreamMain:
    """The installed openrlhf's `__main__` block of cli/train_ppo_ray.py (read once per process)."""
    path = _upstream_source_path(UPSTREAM_MODULE)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    return extract_upstream_main(source, path)


@functools.lru_cache(maxsize=None)
def upstream_hierarchize() -> Callable:
    """OpenRLHF's `hierarchize` (openrlhf/utils/config.py).

    `openrlhf.utils`'s __init__ imports torch, transformers and DeepSpeed (several seconds); the
    config module itself imports nothing, so unless it is already imported, it is loaded alone.
    """
    if UPSTREAM_CONFIG_MODULE in sys.modules:
        return sys.modules[UPSTREAM_CONFIG_MODULE].hierarchize
    path = _upstream_source_path(UPSTREAM_CONFIG_MODULE)
    spec = importlib.util.spec_from_file_location("openrlhf_sapo.cli._upstream_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "hierarchize", None)):
        raise upstream.UpstreamMismatch(f"{path} has no hierarchize(); openrlhf_sapo expects openrlhf=={OPENRLHF_VERSION}")
    return module.hierarchize


# ---------------------------------------------------------------- parser


def _action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action:
    for action in parser._actions:
        if action.dest == dest:
            return action
    raise upstream.UpstreamMismatch(f"OpenRLHF's train_ppo_ray parser has no `--{dest}`; openrlhf_sapo expects "
                                f"openrlhf=={OPENRLHF_VERSION}")


def build_parser() -> argparse.ArgumentParser:
    """Upstream's parser (built by its own code) with SAPO's additions."""
    parser = upstream_main().build_parser()
    clashes = sorted({a.dest for a in parser._actions} & set(ADDED_DESTS))
    if clashes:
        raise upstream.UpstreamMismatch(f"OpenRLHF's parser now defines {clashes} itself; openrlhf_sapo adds these "
                                    "flags: remove them from ADDED_FLAGS in openrlhf_sapo/cli/train_ppo_ray.py")
    estimator = _action(parser, ESTIMATOR_DEST)
    if not estimator.choices or SAPO_ESTIMATOR in estimator.choices:
        raise upstream.UpstreamMismatch(f"OpenRLHF's --{ESTIMATOR_DEST} choices are {estimator.choices}; openrlhf_sapo "
                                    f"expects a list without '{SAPO_ESTIMATOR}' to extend")
    estimator.choices = [*estimator.choices, SAPO_ESTIMATOR]
    estimator.help = (estimator.help or "") + ESTIMATOR_HELP_SUFFIX
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


# ---------------------------------------------------------------- validation


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
    from openrlhf_sapo.cli.preflight import is_vlm_model

    images = args.data.max_images_per_prompt
    if images > 0 or is_vlm_model(args.actor.model_name_or_path):
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
