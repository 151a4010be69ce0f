"""`python -m openrlhf_sapo.cli.train_ppo_ray`: upstream's flags and validation, SAPO's additions, --dry-run.

The reference for "what upstream does" is the installed openrlhf/cli/train_ppo_ray.py run as
`__main__`, untouched (`run_upstream_main`): its heavy imports (Ray, vLLM, DeepSpeed) are replaced
by stand-ins, and `train(args)` is stopped where it first asks for a strategy, so the parser it
built and the arguments it validated can be compared with ours. Nothing starts Ray.
"""

import argparse
import ast
import importlib.util
import json
import os
import re
import runpy
import subprocess
import sys
import types
from types import SimpleNamespace

import pytest

from openrlhf_sapo import OPENRLHF_VERSION
from openrlhf_sapo import patches
from openrlhf_sapo import upstream as sapo_upstream
from openrlhf_sapo.cli import train_ppo_ray as cli
from tests.fixtures.upstream_example_flags import EXAMPLES, PPO_HYBRID_ENGINE, VLM_MATH_HYBRID_ENGINE, with_flag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENRLHF_DIR = list(importlib.util.find_spec("openrlhf").submodule_search_locations)[0]
UPSTREAM_FILE = os.path.join(OPENRLHF_DIR, "cli", "train_ppo_ray.py")
RUN_NAME = re.compile(r"ppo_\d{4}T\d\d:\d\d$")  # upstream's default wandb run name: the time of parsing


# ---------------------------------------------------------------- upstream, run untouched


class _TrainReached(Exception):
    def __init__(self, args):
        super().__init__("upstream train(args) reached get_strategy")
        self.config = args


def _stand_in(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return f"<stand-in {name}.{attr}>"

    module.__getattr__ = __getattr__
    return module


def _must_not_start_ray(*args, **kwargs):
    raise AssertionError("a test must not start Ray")


def _reached_strategy(args):
    raise _TrainReached(args)


def run_upstream_main(argv):
    """Run the installed upstream launcher as __main__ on argv: (its parser, its validated args).

    Errors upstream raises (SystemExit from argparse, AssertionError, TypeError, ...) propagate.
    """
    captured = {}
    real_parse_args = argparse.ArgumentParser.parse_args

    def capture_parser(self, args=None, namespace=None):
        captured["parser"] = self
        return real_parse_args(self, args, namespace)

    config = runpy.run_path(os.path.join(OPENRLHF_DIR, "utils", "config.py"))  # imports nothing
    stand_ins = {
        "ray": _stand_in("ray", is_initialized=lambda: True, init=_must_not_start_ray),
        "ray.util": _stand_in("ray.util"),
        "ray.util.placement_group": _stand_in("ray.util.placement_group"),
        "openrlhf.trainer": _stand_in("openrlhf.trainer"),
        "openrlhf.trainer.ray": _stand_in("openrlhf.trainer.ray"),
        "openrlhf.trainer.ray.launcher": _stand_in("openrlhf.trainer.ray.launcher"),
        "openrlhf.trainer.ray.ppo_actor": _stand_in("openrlhf.trainer.ray.ppo_actor"),
        "openrlhf.trainer.ray.ppo_critic": _stand_in("openrlhf.trainer.ray.ppo_critic"),
        "openrlhf.utils": _stand_in("openrlhf.utils", get_strategy=_reached_strategy),
        "openrlhf.utils.config": _stand_in("openrlhf.utils.config", hierarchize=config["hierarchize"]),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, module in stand_ins.items():
            mp.setitem(sys.modules, name, module)
        mp.setattr(argparse.ArgumentParser, "parse_args", capture_parser)
        mp.setattr(sys, "argv", [UPSTREAM_FILE, *argv])
        try:
            runpy.run_path(UPSTREAM_FILE, run_name="__main__")
        except _TrainReached as reached:
            return captured["parser"], reached.config
    raise AssertionError("upstream's __main__ finished without calling train(args)")


# ---------------------------------------------------------------- helpers


def plain(value):
    """SimpleNamespace trees as dicts (values untouched)."""
    if isinstance(value, SimpleNamespace):
        return {k: plain(v) for k, v in vars(value).items()}
    return value


def without_additions(config: dict) -> dict:
    """Our resolved config minus what this project adds, with the time-stamped run name normalised."""
    config = json.loads(json.dumps(config, default=repr))  # deep copy
    for dest in cli.ADDED_DESTS:  # every flag this project adds, by its dotted dest
        *parents, leaf = dest.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node.pop(leaf)
    config["algo"].pop("sapo")
    return normalise_run_name(config)


def normalise_run_name(config: dict) -> dict:
    config = json.loads(json.dumps(config, default=repr))
    assert RUN_NAME.match(config["logger"]["wandb"]["run_name"])
    config["logger"]["wandb"]["run_name"] = "ppo_<time>"
    return config


def rejected(argv, capsys) -> str:
    """parse_args must exit with status 2 (parser.error); returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def option_strings(argv):
    return [a for a in argv if a.startswith("--")]


# ---------------------------------------------------------------- upstream example scripts


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_flag_sets_exist_upstream_and_resolve_exactly_as_upstream(name):
    argv = EXAMPLES[name]
    upstream_parser, upstream_args = run_upstream_main(argv)
    unknown = [opt for opt in option_strings(argv) if opt not in upstream_parser._option_string_actions]
    assert not unknown, f"{name} uses flags openrlhf {OPENRLHF_VERSION} does not have: {unknown}"

    ours = cli.parse_args([*argv, "--dry-run"])
    assert without_additions(plain(ours)) == normalise_run_name(plain(upstream_args))
    assert ours.dry_run is True
    assert vars(ours.algo.sapo) == {flag.option[len("--algo.sapo."):]: flag.kwargs["default"]
                                    for flag in cli.ADDED_FLAGS if flag.option.startswith("--algo.sapo.")}


def test_example_flag_sets_resolve_as_upstream_documents():
    ppo = plain(cli.parse_args([*PPO_HYBRID_ENGINE, "--dry-run"]))
    assert ppo["algo"]["advantage"]["estimator"] == "gae"
    assert ppo["critic"]["model_name_or_path"] == "OpenRLHF/Llama-3-8b-rm-700k"  # critic from the reward model
    assert ppo["rollout"]["max_tokens_per_gpu"] == 16384  # dynamic batching copies the train budget
    assert ppo["rollout"]["vllm_generate_batch_size"] == 1024

    grpo = plain(cli.parse_args([*EXAMPLES["grpo_hybrid_engine"], "--dry-run"]))
    assert grpo["algo"]["advantage"]["estimator"] == "group_norm"
    assert grpo["critic"]["model_name_or_path"] is None  # every estimator but gae drops the critic
    assert grpo["algo"]["kl"]["estimator"] == "k3"

    agent = plain(cli.parse_args([*EXAMPLES["reinforce_baseline_agent_async"], "--dry-run"]))
    assert agent["reward"]["remote_url"] == ["agent"]
    assert agent["ds"]["packing_samples"] is True

    vlm = plain(cli.parse_args([*VLM_MATH_HYBRID_ENGINE, "--dry-run"]))
    assert vlm["critic"]["model_name_or_path"] is None
    assert vlm["data"]["max_images_per_prompt"] == 1 and vlm["ds"]["packing_samples"] is False


def test_group_estimators_resolve_exactly_as_upstream():
    base = EXAMPLES["reinforce_hybrid_engine"]
    for estimator in ("rloo", "reinforce_baseline", "group_norm", "dr_grpo"):
        argv = with_flag(base, "--algo.advantage.estimator", estimator)
        argv = with_flag(argv, "--rollout.n_samples_per_prompt", "4")
        _, upstream_args = run_upstream_main(argv)
        ours = cli.parse_args(argv)
        assert ours.critic.model_name_or_path is None
        assert without_additions(plain(ours)) == normalise_run_name(plain(upstream_args)), estimator


def test_cli_subprocess_dry_run_prints_json_and_imports_nothing_heavy():
    argv = with_flag(PPO_HYBRID_ENGINE, "--algo.advantage.estimator", "sapo") + ["--algo.sapo.topk_percent", "20"]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "openrlhf_sapo.cli.train_ppo_ray", *argv, "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads(proc.stdout)  # stdout is exactly one JSON document
    assert config["algo"]["advantage"]["estimator"] == "sapo"
    assert config["critic"]["model_name_or_path"] == "OpenRLHF/Llama-3-8b-rm-700k"  # kept and defaulted as for gae
    assert config["algo"]["sapo"]["topk_percent"] == 20.0 and config["algo"]["sapo"]["segmenter"] == "entropy"
    assert config["ckpt"]["max_mem"] == "inf"  # not JSON: printed via str
    assert "[Warning]" in proc.stderr  # upstream's warnings are moved off stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported, "python -X importtime printed nothing"
    assert not imported & {"ray", "vllm", "torch", "deepspeed", "transformers"}


# ---------------------------------------------------------------- the parser


def test_every_upstream_flag_is_present_and_unchanged():
    upstream_parser, _ = run_upstream_main(["--rollout.n_samples_per_prompt", "1", "--reward.remote_url", "r.py"])
    ours = cli.build_parser()
    up = {a.dest: a for a in upstream_parser._actions}
    mine = {a.dest: a for a in ours._actions}
    assert set(mine) - set(up) == set(cli.ADDED_DESTS)
    assert set(up) <= set(mine)
    assert len(up) > 150  # sanity: the real upstream parser
    for dest, a in up.items():
        b = mine[dest]
        assert (b.option_strings, type(b), b.nargs, b.const, b.type, b.required, b.metavar) == (
            a.option_strings, type(a), a.nargs, a.const, a.type, a.required, a.metavar), dest
        if dest == "logger.wandb.run_name":
            assert RUN_NAME.match(a.default) and RUN_NAME.match(b.default)
        else:
            assert b.default == a.default, dest
        if dest == cli.ESTIMATOR_DEST:
            assert list(b.choices) == [*a.choices, "sapo"] and a.default == b.default == "gae"
            assert b.help.startswith(a.help) and "sapo" in b.help
        elif dest == cli.POLICY_LOSS_DEST:  # the Soft Adaptive PO baseline, extended like the estimator
            assert list(b.choices) == [*a.choices, "soft_adaptive"] and a.default == b.default == "ppo"
            assert "Soft Adaptive Policy Optimization" in b.help
        else:
            assert b.choices == a.choices and b.help == a.help, dest


def test_added_flags_nest_and_have_help():
    parser = cli.build_parser()
    for dest in cli.ADDED_DESTS:
        action = next(a for a in parser._actions if a.dest == dest)
        assert action.help and len(action.help) > 20, dest
    args = cli.parse_args(["--reward.remote_url", "r.py", "--vllm.num_engines", "2",
                           "--vllm.pipeline_parallel_size", "2", "--algo.advantage.critic_lambd", "1.0",
                           "--algo.sapo.value_at", "start", "--algo.sapo.ratio", "token", "--algo.sapo.adv_clip", "0"])
    assert args.vllm.pipeline_parallel_size == 2 and args.algo.advantage.critic_lambd == 1.0
    assert (args.algo.sapo.value_at, args.algo.sapo.ratio, args.algo.sapo.adv_clip) == ("start", "token", 0.0)
    assert args.algo.sapo.step_pattern == r"Step \d+" and args.algo.sapo.fixed_length == 64
    assert args.algo.sapo.lowprob_threshold == 0.9 and args.algo.sapo.lowprob_every_k == 4


def test_help_says_sapo_flags_have_no_effect_without_sapo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with any other estimator they are carried in the configuration (still checked) and have no effect" in out
    assert "{gae,reinforce,rloo,reinforce_baseline,group_norm,dr_grpo,flash_reinforce,sapo}" in out
    assert "--dry-run" in out and "--algo.sapo.topk_percent" in out


def test_sapo_flags_are_carried_with_other_estimators():
    args = cli.parse_args(["--reward.model_name_or_path", "rm", "--algo.sapo.segmenter", "newline",
                           "--algo.sapo.topk_percent", "10"])
    assert args.algo.advantage.estimator == "gae"
    assert (args.algo.sapo.segmenter, args.algo.sapo.topk_percent) == ("newline", 10.0)


def test_segmenter_choices_and_flags_come_from_the_registry():
    """The CLI does not import torch for a parser: its segmenter choices, option flags and defaults are
    read from openrlhf_sapo.config.SEGMENTERS, as the algorithm's registry is."""
    from openrlhf_sapo import algo, config

    parser_actions = {a.dest: a for a in cli.build_parser()._actions}
    assert list(parser_actions["algo.sapo.segmenter"].choices) == list(config.SEGMENTERS) == list(algo.SEGMENTERS)
    for flag, (name, option) in config.segmenter_flags().items():
        assert parser_actions[f"algo.sapo.{flag}"].default == option.default == config.SAPO_DEFAULTS[flag]
        assert option.argument in algo.get_segmenter(name).options
    assert algo.DEFAULT_STEP_PATTERN == config.SAPO_DEFAULTS["step_pattern"] == r"Step \d+"


# ---------------------------------------------------------------- SAPO keeps the critic


@pytest.mark.parametrize("critic_source", [
    ["--reward.model_name_or_path", "rm-a,rm-b"],  # -> the first reward model
    ["--reward.remote_url", "reward.py", "--actor.model_name_or_path", "actor"],  # -> the actor
    ["--train.agent_func_path", "agent.py", "--actor.model_name_or_path", "actor"],  # -> the actor
    ["--reward.remote_url", "reward.py", "--critic.model_name_or_path", "critic"],  # explicit
])
def test_sapo_keeps_and_defaults_the_critic_exactly_as_gae(critic_source):
    argv = ["--vllm.num_engines", "2", "--ds.packing_samples", "--ds.ring_attn_size", "2", *critic_source]
    # SAPO also takes the recipe's values of the options it was not given (test_sapo_recipe_*)
    _, upstream_gae = run_upstream_main([*argv, "--algo.advantage.estimator", "gae", *RECIPE_FLAGS])
    sapo = cli.parse_args([*argv, "--algo.advantage.estimator", "sapo"])
    assert sapo.algo.advantage.estimator == "sapo"
    assert sapo.critic.model_name_or_path == upstream_gae.critic.model_name_or_path
    assert sapo.critic.model_name_or_path in ("rm-a", "actor", "critic")
    ours = without_additions(plain(sapo))
    ours["algo"]["advantage"]["estimator"] = "gae"
    assert ours == normalise_run_name(plain(upstream_gae))


def test_sapo_and_gae_on_a_vlm_keep_the_vlm_critic_where_upstream_refuses(capsys):
    for estimator in ("sapo", "gae"):
        args = cli.parse_args(with_flag(VLM_MATH_HYBRID_ENGINE, "--algo.advantage.estimator", estimator))
        assert args.algo.advantage.estimator == estimator
        assert args.critic.model_name_or_path == "Qwen/Qwen3.5-2B"  # remote reward: the critic defaults to the actor
        assert args.data.max_images_per_prompt == 1  # restored after upstream's validation
    with pytest.raises(AssertionError, match="VLM training does not support critic model"):
        run_upstream_main(with_flag(VLM_MATH_HYBRID_ENGINE, "--algo.advantage.estimator", "gae"))


# ---------------------------------------------------------------- SAPO's recipe for options not given

RECIPE_FLAGS = ["--algo.advantage.lambd", "0.99", "--actor.eps_clip_low_high", "0.2", "0.28",
                "--actor.dual_clip", "3.0", "--algo.kl.init_coef", "0.001"]
RECIPE_ARGV = ["--actor.model_name_or_path", "actor", "--reward.remote_url", "r.py", "--vllm.num_engines", "1"]


def recipe_values(args):
    return (args.algo.advantage.gamma, args.algo.advantage.lambd, list(args.actor.eps_clip_low_high),
            args.actor.dual_clip, args.algo.kl.init_coef, args.algo.kl.estimator)


@pytest.mark.parametrize("cli_module", ["train_ppo_ray", "train_local"])
def test_sapo_recipe_fills_what_the_command_line_left_unset(cli_module, capsys):
    parse = importlib.import_module(f"openrlhf_sapo.cli.{cli_module}").parse_args
    bare = parse([*RECIPE_ARGV, "--algo.advantage.estimator", "sapo"])
    assert recipe_values(bare) == (1.0, 0.99, [0.2, 0.28], 3.0, 0.001, "k1")
    err = capsys.readouterr().err
    assert "SAPO recipe: --algo.advantage.lambd 0.99 (not set; paper Table 7)" in err
    assert "SAPO recipe: --actor.dual_clip 3.0" in err and "--actor.eps_clip_low_high 0.2 0.28" in err
    sources = bare.algo.sapo.sources
    assert sources["algo.advantage.lambd"] == "SAPO recipe: paper Table 7"
    assert sources["algo.advantage.gamma"].startswith("OpenRLHF default (= SAPO recipe")
    assert sources["algo.sapo.value_at"] == "SAPO default"
    # Explicit values win, also when they equal upstream's default; a symmetric clip or KL as a loss is a choice.
    chosen = parse([*RECIPE_ARGV, "--algo.advantage.estimator", "sapo", "--algo.advantage.lambd", "1",
                    "--actor.eps_clip", "0.1", "--actor.dual_clip", "4", "--algo.kl.use_loss",
                    "--algo.sapo.value_at", "start"])
    assert recipe_values(chosen) == (1.0, 1.0, [0.1, 0.1], 4.0, 0.01, "k1")
    assert chosen.algo.sapo.sources["algo.advantage.lambd"] == "command line"
    assert chosen.algo.sapo.sources["actor.eps_clip_low_high"] == "OpenRLHF default (kept: --actor.eps_clip was set)"
    assert chosen.algo.sapo.sources["algo.sapo.value_at"] == "command line"
    # Other estimators keep upstream's defaults.
    gae = parse([*RECIPE_ARGV, "--algo.advantage.estimator", "gae"])
    assert recipe_values(gae) == (1.0, 1.0, [0.2, 0.2], None, 0.01, "k1") and not hasattr(gae.algo.sapo, "sources")


def test_dry_run_shows_where_each_sapo_value_came_from():
    out = subprocess.run([sys.executable, "-m", "openrlhf_sapo.cli.train_ppo_ray", *RECIPE_ARGV,
                          "--algo.advantage.estimator", "sapo", "--algo.sapo.topk_percent", "20", "--dry-run"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    config = json.loads(out.stdout)
    assert config["actor"]["dual_clip"] == 3.0
    assert config["algo"]["sapo"]["sources"]["actor.dual_clip"] == "SAPO recipe: release (dual clip 3.0)"
    assert config["algo"]["sapo"]["sources"]["algo.sapo.topk_percent"] == "command line"


# ---------------------------------------------------------------- rejected combinations

BASE = ["--actor.model_name_or_path", "actor", "--reward.model_name_or_path", "rm", "--vllm.num_engines", "1"]
SAPO = [*BASE, "--algo.advantage.estimator", "sapo"]
VLM = ["--actor.model_name_or_path", "vlm", "--reward.remote_url", "r.py", "--vllm.num_engines", "1",
       "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "8",
       "--data.max_images_per_prompt", "1"]
COLOCATED = [*BASE, "--train.colocate_all", "--actor.num_gpus_per_node", "8", "--vllm.tensor_parallel_size", "2"]

REJECTED = {
    "sapo_with_gspo": ([*SAPO, "--actor.policy_loss_type", "gspo"],
                       ["--actor.policy_loss_type gspo cannot be combined with --algo.advantage.estimator sapo",
                        "--algo.sapo.ratio"]),
    "sapo_without_any_critic_source": (["--algo.advantage.estimator", "sapo"],
                                       ["--algo.advantage.estimator sapo needs a critic, and none can be derived",
                                        "--critic.model_name_or_path"]),
    "sapo_remote_reward_without_actor": (["--algo.advantage.estimator", "sapo", "--reward.remote_url", "r.py"],
                                         ["--algo.advantage.estimator sapo needs a critic, but none resolved",
                                          "--actor.model_name_or_path (None)"]),
    "sapo_empty_critic": ([*SAPO, "--critic.model_name_or_path", ""], ["needs a critic, but none resolved"]),
    "gae_without_any_critic_source": (["--algo.advantage.estimator", "gae"],
                                      ["--algo.advantage.estimator gae needs a critic, and none can be derived"]),
    "topk_zero": ([*SAPO, "--algo.sapo.topk_percent", "0"], ["--algo.sapo.topk_percent must be in (0, 100], got 0.0"]),
    "topk_above_100": ([*SAPO, "--algo.sapo.topk_percent", "100.5"], ["--algo.sapo.topk_percent must be in (0, 100]"]),
    "topk_negative": ([*BASE, "--algo.sapo.topk_percent", "-30"], ["--algo.sapo.topk_percent must be in (0, 100]"]),
    "topk_fraction": ([*SAPO, "--algo.sapo.topk_percent", "0.3"],
                      ["--algo.sapo.topk_percent 0.3 would end a segment at 0.3% of the tokens",
                       "for 30% pass --algo.sapo.topk_percent 30", "--algo.sapo.allow_small_topk"]),
    "topk_one": ([*SAPO, "--algo.sapo.topk_percent", "1"], ["for 100% pass --algo.sapo.topk_percent 100"]),
    "dual_clip_at_most_1": ([*SAPO, "--actor.dual_clip", "0.9"], ["--actor.dual_clip must be > 1", "got 0.9"]),
    "clip_low_high": ([*SAPO, "--actor.eps_clip_low_high", "-0.2", "0.28"],
                      ["--actor.eps_clip_low_high must be two values > 0 (0.2 0.28), got -0.2 0.28"]),
    "value_clip_zero": ([*SAPO, "--critic.value_clip", "0"], ["--critic.value_clip must be > 0 (0.5), got 0.0"]),
    "temperature_zero": ([*BASE, "--rollout.temperature", "0"], ["--rollout.temperature must be > 0, got 0.0"]),
    "top_p_above_1": ([*BASE, "--rollout.top_p", "1.5"], ["--rollout.top_p must be in (0, 1], got 1.5"]),
    "kl_negative": ([*BASE, "--algo.kl.init_coef", "-0.1"], ["--algo.kl.init_coef must be >= 0"]),
    "lr_zero": ([*BASE, "--critic.adam.lr", "0"], ["--critic.adam.lr must be > 0, got 0.0"]),
    "topk_nan": ([*SAPO, "--algo.sapo.topk_percent", "nan"], ["--algo.sapo.topk_percent must be in (0, 100]"]),
    "unknown_segmenter": ([*SAPO, "--algo.sapo.segmenter", "bogus"],
                          ["argument --algo.sapo.segmenter: invalid choice: 'bogus'",
                           "'entropy', 'newline', 'step', 'lowprob', 'fixed'"]),
    "unknown_value_at": ([*SAPO, "--algo.sapo.value_at", "middle"],
                         ["argument --algo.sapo.value_at: invalid choice: 'middle' (choose from 'end', 'start')"]),
    "unknown_ratio": ([*SAPO, "--algo.sapo.ratio", "sequence"],
                      ["argument --algo.sapo.ratio: invalid choice: 'sequence' (choose from 'segment', 'token')"]),
    "unknown_estimator": ([*BASE, "--algo.advantage.estimator", "ppo"],
                          ["argument --algo.advantage.estimator: invalid choice: 'ppo'", "'sapo'"]),
    "vlm_packing": ([*VLM, "--ds.packing_samples"],
                    ["VLM training (--data.max_images_per_prompt 1) cannot use sample packing, which "
                     "--ds.packing_samples turns on", "Remove --ds.packing_samples"]),
    "vlm_ring_attention": ([*VLM, "--ds.ring_attn_size", "2"],
                           ["cannot use sample packing, which --ds.ring_attn_size 2 turns on",
                            "Remove --ds.ring_attn_size"]),
    "vlm_dynamic_batch": ([*VLM, "--train.dynamic_batch_enable"],
                          ["cannot use sample packing, which --train.dynamic_batch_enable turns on"]),
    "vlm_sapo_ring_and_dynamic_batch": (
        [*with_flag(VLM, "--algo.advantage.estimator", "sapo"), "--ds.ring_attn_size", "4",
         "--train.dynamic_batch_enable"],
        ["--ds.ring_attn_size 4, --train.dynamic_batch_enable turn on",
         "Remove --ds.ring_attn_size and --train.dynamic_batch_enable"]),
    "packing_without_vllm": ([*BASE[:4], "--ds.packing_samples"],
                             ["--ds.packing_samples", "is only supported with vLLM: set --vllm.num_engines >= 1"]),
    "packing_with_zero_engines": ([*BASE[:4], "--vllm.num_engines", "0", "--ds.packing_samples"],
                                  ["OpenRLHF's check failed (train_ppo_ray.py:",
                                   "Only support `--packing_samples` with vLLM."]),
    "pipeline_zero": ([*BASE, "--vllm.pipeline_parallel_size", "0"],
                      ["--vllm.pipeline_parallel_size must be >= 1, got 0"]),
    "pipeline_without_engines": ([*BASE[:4], "--vllm.pipeline_parallel_size", "2"],
                                 ["--vllm.pipeline_parallel_size 2 needs vLLM engines, "
                                  "but --vllm.num_engines is None"]),
    "pipeline_with_zero_engines": ([*BASE[:4], "--vllm.num_engines", "0", "--vllm.pipeline_parallel_size", "2"],
                                   ["needs vLLM engines, but --vllm.num_engines is 0"]),
    "colocated_gpu_mismatch": (with_flag(COLOCATED, "--vllm.num_engines", "4") + ["--vllm.pipeline_parallel_size", "2"],
                               ["--actor.num_nodes * --actor.num_gpus_per_node (1 * 8 = 8)",
                                "--vllm.tensor_parallel_size * --vllm.pipeline_parallel_size = 2 * 2 = 4 GPUs: "
                                "4 * 4 = 16", "Change --vllm.num_engines (to 2)"]),
    "colocated_gpu_mismatch_tp_only": (with_flag(COLOCATED, "--vllm.num_engines", "2"),
                                       ["(1 * 8 = 8) must equal", "2 * 1 = 2 GPUs: 2 * 2 = 4"]),
    "lambd_above_1": ([*SAPO, "--algo.advantage.lambd", "1.5"], ["--algo.advantage.lambd must be in [0, 1], got 1.5"]),
    "critic_lambd_negative": ([*SAPO, "--algo.advantage.critic_lambd", "-0.1"],
                              ["--algo.advantage.critic_lambd must be in [0, 1], got -0.1"]),
    "gamma_above_1": ([*BASE, "--algo.advantage.gamma", "1.01"],
                      ["--algo.advantage.gamma must be in [0, 1], got 1.01"]),
    "adv_clip_negative": ([*SAPO, "--algo.sapo.adv_clip", "-1"], ["--algo.sapo.adv_clip must be >= 0, got -1.0",
                                                                   "pass 0 to disable"]),
    "lowprob_threshold_zero": ([*SAPO, "--algo.sapo.lowprob_threshold", "0"],
                               ["--algo.sapo.lowprob_threshold must be a probability in (0, 1], got 0.0"]),
    "lowprob_every_k_zero": ([*SAPO, "--algo.sapo.lowprob_every_k", "0"],
                             ["--algo.sapo.lowprob_every_k must be >= 1, got 0"]),
    "fixed_length_zero": ([*SAPO, "--algo.sapo.fixed_length", "0"], ["--algo.sapo.fixed_length must be >= 1 token"]),
    "bad_step_pattern": ([*SAPO, "--algo.sapo.step_pattern", "Step ("],
                         ["--algo.sapo.step_pattern 'Step (' is not a valid regular expression"]),
    "upstream_assert_group_norm": ([*BASE, "--algo.advantage.estimator", "group_norm"],
                                   ["OpenRLHF's check failed (train_ppo_ray.py:",
                                    "group_norm requires n_samples_per_prompt > 1"]),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_invalid_combination_is_rejected_with_its_message(name, capsys):
    argv, fragments = REJECTED[name]
    err = rejected([*argv, "--dry-run"], capsys)
    # one line with the message, one pointing to --help: no usage dump
    assert "usage:" not in err and "error:" in err and err.rstrip().endswith("--help` lists every flag)")
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err[-600:]!r}"


def test_boundaries_are_accepted():
    for extra in (["--algo.sapo.topk_percent", "100"], ["--algo.sapo.topk_percent", "1.5"],
                  ["--algo.sapo.topk_percent", "0.5", "--algo.sapo.allow_small_topk"],
                  ["--algo.sapo.adv_clip", "0"], ["--algo.advantage.lambd", "0"], ["--algo.advantage.gamma", "1"],
                  ["--algo.advantage.critic_lambd", "1"], ["--algo.sapo.lowprob_threshold", "1"]):
        cli.parse_args([*SAPO, *extra])
    colocated = cli.parse_args(with_flag(COLOCATED, "--vllm.num_engines", "2") + ["--vllm.pipeline_parallel_size", "2"])
    assert colocated.vllm.num_engines * colocated.vllm.tensor_parallel_size * colocated.vllm.pipeline_parallel_size == 8
    # async colocation keeps vLLM outside the actor's GPUs (upstream checks the count only for sync runs)
    cli.parse_args(with_flag(COLOCATED, "--vllm.num_engines", "1") + ["--train.async_enable"])


def test_upstream_silently_enables_packing_for_a_vlm():
    """Why the VLM check exists: upstream accepts these and turns packing on for a VLM."""
    for extra in (["--ds.ring_attn_size", "2"], ["--train.dynamic_batch_enable"]):
        _, upstream_args = run_upstream_main([*VLM, *extra])
        assert upstream_args.ds.packing_samples is True and upstream_args.data.max_images_per_prompt == 1


def test_upstream_crashes_where_we_give_a_message():
    with pytest.raises(AttributeError, match="split"):  # None.split(",") for gae's critic default
        run_upstream_main(["--algo.advantage.estimator", "gae"])
    with pytest.raises(TypeError):  # `None > 0` for packing without --vllm.num_engines
        run_upstream_main([*BASE[:4], "--ds.packing_samples"])


def test_upstream_asserts_hold_under_python_O():
    proc = subprocess.run(
        [sys.executable, "-O", "-m", "openrlhf_sapo.cli.train_ppo_ray", *BASE, "--algo.advantage.estimator",
         "group_norm", "--dry-run"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "group_norm requires n_samples_per_prompt > 1" in proc.stderr
    assert proc.stdout == ""


def test_assertion_message_points_into_the_upstream_file(capsys):
    err = rejected([*BASE, "--algo.advantage.estimator", "rloo"], capsys)
    line = int(re.search(r"\(train_ppo_ray\.py:(\d+)\)", err).group(1))
    lines = open(UPSTREAM_FILE, encoding="utf-8").read().splitlines()
    statement = "\n".join(lines[line - 3:line + 2])  # a multi-line assert reports its failing expression's line
    assert re.search(r"^\s*assert \($", statement, re.M) and "args.rollout.n_samples_per_prompt > 1" in lines[line - 1]
    assert "requires n_samples_per_prompt > 1" in statement


# ---------------------------------------------------------------- main()


def test_main_dry_run_prints_the_config_and_starts_nothing(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(patches, "install_for_training", lambda args, **kw: calls.append("install"), raising=False)
    monkeypatch.setattr(sapo_upstream, "upstream", lambda module, attribute: calls.append("train"))
    cli.main([*SAPO, "--dry-run"])
    out = capsys.readouterr().out
    config = json.loads(out)
    assert calls == []
    assert config["algo"]["advantage"]["estimator"] == "sapo" and config["critic"]["model_name_or_path"] == "rm"
    assert config["dry_run"] is True and config["algo"]["sapo"]["value_at"] == "end"


def test_main_installs_sapo_then_runs_upstream_train(monkeypatch):
    calls = []
    monkeypatch.setattr(patches, "install_for_training", lambda args, **kw: calls.append(("install", args, kw)) or [], raising=False)
    trains = []

    def fake_upstream(module, attribute):
        trains.append((module, attribute))  # main() runs OpenRLHF's own train(), through openrlhf_sapo.upstream
        return lambda args: calls.append(("train", args))

    monkeypatch.setattr(sapo_upstream, "upstream", fake_upstream)
    cli.main(SAPO)
    assert trains == [("openrlhf.cli.train_ppo_ray", "train")]
    assert [call[0] for call in calls] == ["install", "train"] and calls[0][2] == {"ray_driver": True}
    assert calls[0][1] is calls[1][1] and calls[1][1].algo.advantage.estimator == "sapo"
    assert calls[1][1].critic.model_name_or_path == "rm"


# ---------------------------------------------------------------- extraction


def upstream_source() -> str:
    return open(UPSTREAM_FILE, encoding="utf-8").read()


def test_extraction_runs_upstreams_own_code_with_only_its_light_imports():
    main = cli.upstream_main()
    assert main.filename == UPSTREAM_FILE
    assert isinstance(main.build_parser(), argparse.ArgumentParser)
    namespace = main.build_parser.__globals__
    assert namespace is main.validate.__globals__
    assert {"argparse", "datetime"} <= set(namespace) and "ray" not in namespace and "train" not in namespace
    assert main.build_parser.__code__.co_filename == UPSTREAM_FILE  # tracebacks point into upstream


def test_extraction_of_an_unchanged_source_string():
    main = cli.extract_upstream_main(upstream_source(), "train_ppo_ray.py")
    assert isinstance(main.build_parser(), argparse.ArgumentParser)


MODIFIED_SOURCES = {
    "no_final_train": (lambda s: s.rstrip().rsplit("\n", 1)[0] + "\n",
                       "ends with `if args.use_ms:`, not `train(args)`"),
    "no_main_guard": (lambda s: s.replace('if __name__ == "__main__":', "if False:"),
                      "found 0 top-level `if __name__ == \"__main__\":` blocks"),
    "other_first_statement": (lambda s: s.replace("parser = argparse.ArgumentParser()",
                                                  "parser = argparse.ArgumentParser(prog='x')"),
                              "starts with `parser = argparse.ArgumentParser(prog='x')`"),
    "no_parse_args": (lambda s: s.replace("args = parser.parse_args()", "args = parser.parse_known_args()[0]"),
                      "has 0 statements `args = parser.parse_args()`"),
    "no_hierarchize": (lambda s: s.replace("    args = hierarchize(args)\n", ""),
                       "has 0 statements `args = hierarchize(args)`"),
    "hierarchize_moved": (lambda s: s.replace("    from openrlhf.utils.config import hierarchize\n", ""),
                          "after `args = parser.parse_args()` found"),
    "no_use_ms_block": (lambda s: s.replace("    if args.use_ms:", "    if args.use_ms and False:"),
                        "not `if args.use_ms:`"),
    "validation_uses_parser": (lambda s: s.replace("    args = hierarchize(args)\n",
                                                   "    args = hierarchize(args)\n    parser.exit(0)\n"),
                               "the validate statements use `parser`"),
    "not_python": (lambda s: s + "\n  )(\n", "the source does not parse"),
}


@pytest.mark.parametrize("name", sorted(MODIFIED_SOURCES))
def test_changed_upstream_raises_upstream_mismatch(name):
    modify, fragment = MODIFIED_SOURCES[name]
    source = modify(upstream_source())
    assert source != upstream_source()
    with pytest.raises(sapo_upstream.UpstreamMismatch) as err:
        cli.extract_upstream_main(source, "train_ppo_ray.py")
    message = str(err.value)
    assert fragment in message, message
    assert f"Install openrlhf=={OPENRLHF_VERSION}" in message and "train_ppo_ray.py" in message


def test_extraction_falls_back_to_the_module_namespace_for_non_import_globals():
    source = upstream_source().replace('    parser = argparse.ArgumentParser()\n',
                                       '    parser = argparse.ArgumentParser()\n    HELPER(parser)\n', 1)
    source = source.replace('if __name__ == "__main__":', 'def HELPER(p):\n    p.marked = True\n\n\n'
                            'if __name__ == "__main__":')
    # `parser = argparse.ArgumentParser()` stays first: the anchors hold; HELPER is a module-level def
    fake = types.ModuleType("fake_upstream")
    fake.HELPER = lambda p: setattr(p, "marked", "module")
    fake.argparse = argparse
    fake.datetime = __import__("datetime").datetime
    main = cli.extract_upstream_main(source, "train_ppo_ray.py", import_module=lambda: fake)
    assert main.build_parser().marked == "module"  # HELPER came from the imported module's namespace
    missing = types.ModuleType("fake_upstream")
    with pytest.raises(sapo_upstream.UpstreamMismatch, match="uses \\['HELPER', 'argparse', 'datetime'\\]"):
        cli.extract_upstream_main(source, "train_ppo_ray.py", import_module=lambda: missing)
