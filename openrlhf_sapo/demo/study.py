"""`python -m openrlhf_sapo.demo.study` (`make study`): the paper's analyses at small scale, on the demo's tasks.

Every arm of the study is one of the demo's methods (PPO, GRPO, SAPO) with extra flags: VC-PPO, Qwen's Soft
Adaptive PO (a baseline), SAPO's top-k sweep (Fig. 5), naive-IS (Table 2), other segmenters (Table 3) and
the value read at segment starts; and, named with --only, the diagnosis arms (a critic-only warm-up, twice
the steps) that ask why SAPO loses where it does. For each task, every arm trains from the same warm start
with the same seeds (paired: seed s gives every arm the same prompt order and sampling seed), with the
demo's budget per run. Runs go to `<out>/<task>/runs/<arm>_seed<s>`; a run that finished with the same
command is not run again, so an interrupted study resumes where it stopped. `<out>/study.json` lists the runs; the report
(demo/study_report.py) is `<out>/report.md` with one plot per figure and one table per table.

    python -m openrlhf_sapo.demo.study                            # the paper's analyses (docs/study)
    python -m openrlhf_sapo.demo.study --task digits --only critic_warmup budget   # the diagnosis
    python -m openrlhf_sapo.demo.study --quick                    # every arm, 2 steps, 1 seed (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

from openrlhf_sapo.demo.run import PRESETS, _write_json, method_flags, prepare, run_one, train_command
from openrlhf_sapo.demo.tasks import TASKS


@dataclass(frozen=True)
class Arm:
    method: str  # the demo method it starts from (its recipe)
    flags: Tuple[str, ...] = ()  # appended: argparse keeps the last value, so these override the recipe
    label: str = ""
    steps_factor: int = 1  # RL steps = the preset's x this (the budget diagnosis)
    critic_warmup_fraction: float = 0.0  # extra first steps, this fraction of the preset's, that train the critic only


def arm_steps(arm: "Arm", preset) -> Tuple[int, int]:
    """(RL steps, of which critic-only warm-up steps) of an arm under `preset`. The warm-up is a whole number
    of evaluation intervals, so the last step is evaluated (upstream evaluates every `eval_every` steps)."""
    warmup = 0
    if arm.critic_warmup_fraction:
        intervals = max(1, round(arm.critic_warmup_fraction * preset.steps / preset.eval_every))
        warmup = intervals * preset.eval_every
    return preset.steps * arm.steps_factor + warmup, warmup


# The demo's solutions put each step on its own line and have no "Step N" markers: the step segmenter
# cuts before each "=" instead (where a computation states its result).
STEP_PATTERN = "="

ARMS: Dict[str, Arm] = {
    "ppo": Arm("ppo", label="PPO"),
    "vcppo": Arm("ppo", ("--algo.advantage.critic_lambd", "1.0"), "VC-PPO (critic lambda 1.0)"),
    "grpo": Arm("grpo", label="GRPO"),
    "soft_adaptive": Arm("grpo", ("--actor.policy_loss_type", "soft_adaptive"), "Soft Adaptive PO (Qwen)"),
    "sapo": Arm("sapo", label="SAPO (entropy, top 30%)"),
    **{f"sapo_top{k}": Arm("sapo", ("--algo.sapo.topk_percent", str(k)), f"SAPO top {k}%") for k in (10, 20, 40, 50)},
    "sapo_naive_is": Arm("sapo", ("--algo.sapo.ratio", "token"), "SAPO, token ratio (naive IS)"),
    "sapo_newline": Arm("sapo", ("--algo.sapo.segmenter", "newline"), "SAPO, newline segments"),
    "sapo_step": Arm("sapo", ("--algo.sapo.segmenter", "step", "--algo.sapo.step_pattern", STEP_PATTERN),
                     "SAPO, step segments"),
    "sapo_lowprob": Arm("sapo", ("--algo.sapo.segmenter", "lowprob"), "SAPO, low-probability segments"),
    "sapo_fixed": Arm("sapo", ("--algo.sapo.segmenter", "fixed", "--algo.sapo.fixed_length", "8"),
                      "SAPO, fixed 8-token segments (control)"),
    "sapo_value_start": Arm("sapo", ("--algo.sapo.value_at", "start"), "SAPO, value at segment start"),
    # Diagnosis (item 4): is it the critic or the budget? Critic-only warm-up steps first (upstream's
    # --critic.freezing_steps: the actor is frozen, the critic trains on the warm start's rollouts), then the
    # same actor steps as every arm; or twice the steps (fresh prompts continue the same sequence).
    **{f"{m}_critic_warmup": Arm(m, label=f"{m.upper()}, critic warm-up (+20% critic-only steps first)",
                                 critic_warmup_fraction=0.2) for m in ("sapo", "ppo")},
    **{f"{m}_long": Arm(m, label=f"{m.upper()}, twice the steps", steps_factor=2) for m in ("sapo", "ppo", "grpo")},
}

# The paper's figure or table each group reproduces, and its arms (the first is the reference).
GROUPS: Dict[str, Tuple[str, ...]] = {
    "headline": ("sapo", "ppo", "grpo", "vcppo", "soft_adaptive"),  # Table 1 / section 7, Fig. 3, 6, 7
    "topk": ("sapo", "sapo_top10", "sapo_top20", "sapo_top40", "sapo_top50"),  # Fig. 5
    "ratio": ("sapo", "sapo_naive_is"),  # Table 2
    "segmenter": ("sapo", "sapo_newline", "sapo_step", "sapo_lowprob", "sapo_fixed"),  # Table 3
    "value_at": ("sapo", "sapo_value_start"),  # s_m read at the start (paper) vs end (release)
    "critic_warmup": ("sapo", "sapo_critic_warmup", "ppo", "ppo_critic_warmup", "grpo"),  # item 4: the critic?
    "budget": ("sapo", "sapo_long", "ppo", "ppo_long", "grpo", "grpo_long"),  # item 4: the budget?
}

# The paper's analyses; the diagnosis groups (critic_warmup, budget) run when named with --only.
PAPER_GROUPS = ("headline", "topk", "ratio", "segmenter", "value_at")

# Seeds per task and arm, chosen from the paired spread the study measured (docs/study/README.md) so that
# the headline comparison, SAPO vs PPO and vs GRPO, resolves a 2-point difference (95% interval +-2):
# on digits the paired sd was 3.3-3.6 points at 5 seeds and 4.1-5.2 at 15 (19-29 seeds needed), on
# arithmetic 0.8-1.5 (3-5 seeds). VC-PPO and Soft Adaptive PO on digits: 15. Every other arm: 5 (the
# ablations' paper gaps are 5-11 points).
DEFAULT_SEEDS = (1, 2, 3, 4, 5)
SEEDS = {"digits": {"sapo": tuple(range(1, 31)), "ppo": tuple(range(1, 31)), "grpo": tuple(range(1, 31)),
                    "vcppo": tuple(range(1, 16)), "soft_adaptive": tuple(range(1, 16))}}


def default_seeds(task: str, arm: str) -> Tuple[int, ...]:
    return SEEDS.get(task, {}).get(arm, DEFAULT_SEEDS)


def arm_command(arm_name: str, seed: int, preset, prepared: dict, run_dir: str) -> List[str]:
    arm = ARMS[arm_name]
    steps, warmup = arm_steps(arm, preset)
    cmd = train_command(arm.method, seed, replace(preset, steps=steps), prepared["model"], prepared["data_dir"],
                        run_dir, prepared["is_vlm"])
    return cmd + list(arm.flags) + (["--critic.freezing_steps", str(warmup)] if warmup else [])


def selected_arms(only: Optional[List[str]], every_arm: bool = False) -> List[str]:
    """Arms of the named groups or arms, in ARMS order; without --only the paper's groups (every arm with
    `every_arm`: the quick smoke test)."""
    if not only:
        return list(ARMS) if every_arm else selected_arms(list(PAPER_GROUPS))
    wanted = set()
    for name in only:
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in ARMS:
            wanted.add(name)
        else:
            raise SystemExit(f"--only {name}: not a group ({', '.join(GROUPS)}) or an arm ({', '.join(ARMS)})")
    return [a for a in ARMS if a in wanted]


def earlier_runs(summary_path: str, summary: dict) -> Dict[str, dict]:
    """The finished runs an earlier invocation recorded in the same folder with the same preset, so that
    `--only topk` after `--only headline` reports both. Their arms, labels and tasks join `summary`'s."""
    if not os.path.exists(summary_path):
        return {}
    with open(summary_path) as f:
        before = json.load(f)
    same = {k: v for k, v in before.get("config", {}).items() if k != "seeds"} == \
        {k: v for k, v in summary["config"].items() if k != "seeds"}
    if not same:
        print(f"study: {summary_path} holds runs of another preset or step count; the report will hold this "
              "invocation's runs only (use another --out to keep both)", file=sys.stderr)
        return {}
    kept = {key: run for key, run in before.get("runs", {}).items()
            if run.get("returncode") == 0 and os.path.exists(os.path.join(run["run_dir"], "metrics.jsonl"))}
    for run in kept.values():
        if run["arm"] not in summary["arms"]:
            summary["arms"].append(run["arm"])
            summary["labels"][run["arm"]] = before["labels"].get(run["arm"], run["arm"])
            summary["arm_flags"][run["arm"]] = before["arm_flags"].get(run["arm"], [])
        if run["task"] not in summary["tasks"]:
            summary["tasks"].append(run["task"])
    summary["arms"] = [a for a in ARMS if a in summary["arms"]]
    return kept


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_sapo.demo.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="output folder (default runs/study, runs/study-quick with --quick)")
    parser.add_argument("--task", nargs="+", default=["digits", "arithmetic"], choices=sorted(TASKS),
                        help="the demo tasks to run (default both: digits is the VLM task, arithmetic the text one)")
    parser.add_argument("--quick", action="store_true", help="the demo's quick preset, one seed: a smoke test")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="paired seeds (default: on digits "
                             + ", ".join(f"{arm} 1-{len(s)}" for arm, s in SEEDS["digits"].items())
                             + f", every other arm and task 1-{len(DEFAULT_SEEDS)}; --quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the preset's)")
    parser.add_argument("--only", nargs="+", default=None, metavar="GROUP_OR_ARM",
                        help=f"groups ({', '.join(GROUPS)}) or arms ({', '.join(ARMS)}); default: the paper's "
                             f"groups ({', '.join(PAPER_GROUPS)}); --quick: every arm")
    parser.add_argument("--no-report", action="store_true", help="train only")
    args = parser.parse_args(argv)

    from openrlhf_sapo.demo.numerics import pin_cpu_numerics

    numerics = pin_cpu_numerics()
    from tqdm.auto import tqdm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preset_name = "quick" if args.quick else "full"
    arms = selected_arms(args.only, every_arm=args.quick)
    seeds_of = {(task, arm): tuple(args.seeds or ((1,) if args.quick else default_seeds(task, arm)))
                for task in args.task for arm in arms}
    preset = replace(PRESETS[preset_name], seeds=tuple(sorted(set().union(*seeds_of.values()))))
    if args.steps:
        preset = replace(preset, steps=args.steps)
    out = os.path.abspath(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    os.makedirs(out, exist_ok=True)
    summary_path = os.path.join(out, "study.json")
    t0 = time.time()
    summary = {"preset": preset_name, "config": asdict(preset), "tasks": list(args.task), "arms": list(arms),
               "arm_flags": {a: [*method_flags(ARMS[a].method, "<model>", preset), *ARMS[a].flags] for a in arms},
               "labels": {a: ARMS[a].label for a in arms}, "groups": {g: list(m) for g, m in GROUPS.items()},
               "numerics": numerics,
               "command": " ".join(["python -m openrlhf_sapo.demo.study", *(sys.argv[1:] if argv is None else argv)]),
               "runs": {}, "finished": False}

    summary["runs"] = earlier_runs(summary_path, summary)
    runs = [(task, seed, arm) for task in args.task for seed in preset.seeds for arm in arms
            if seed in seeds_of[task, arm]]
    bar_file = os.fdopen(os.dup(2), "w", buffering=1)
    bar = tqdm(total=sum(arm_steps(ARMS[arm], preset)[0] for _, _, arm in runs), desc="RL steps (whole study)",
               unit="step", file=bar_file)
    prepared: Dict[str, dict] = {}
    for task, seed, arm in runs:
        if task not in prepared:  # the warm start of each task, cached under <out>/<task>/warm_start
            bar.set_postfix(run=f"{task}: warm start")
            longest = max(arm_steps(ARMS[a], preset)[0] for a in arms)
            prepared[task] = prepare(task, preset, os.path.join(out, task), progress=False, train_steps=longest)
        run_dir = os.path.join(out, task, "runs", f"{arm}_seed{seed}")
        bar.set_postfix(run=f"{task} {arm} seed {seed}")
        status = run_one(arm_command(arm, seed, preset, prepared[task], run_dir), run_dir, bar,
                         arm_steps(ARMS[arm], preset)[0])
        status.pop("skipped", None)
        summary["runs"][f"{task}/{arm}_seed{seed}"] = dict(status, task=task, arm=arm, seed=seed, run_dir=run_dir)
        summary["seconds"] = round(time.time() - t0, 1)
        _write_json(summary_path, summary)
    bar.close()
    bar_file.close()
    summary.update(finished=True, seconds=round(time.time() - t0, 1),
                   run_seconds=round(sum(r["seconds"] for r in summary["runs"].values()), 1))
    _write_json(summary_path, summary)
    if not args.no_report:
        from openrlhf_sapo.demo.study_report import write_report

        print(f"report: {write_report(out)}")
    return summary


if __name__ == "__main__":
    main()
