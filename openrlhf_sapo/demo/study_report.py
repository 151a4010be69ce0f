"""`<out>/report.md` of `python -m openrlhf_sapo.demo.study`: each paper figure as a plot, each table as a
table, with the paper's number beside ours where one exists, mean and 95% interval over seeds, paired
differences (same seed, same prompts, same warm start) with their interval, and one sentence per claim:
holds / does not hold / cannot tell at this scale, and why.

    python -m openrlhf_sapo.demo.study_report --out runs/study
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np

from openrlhf_sapo.demo import figures
from openrlhf_sapo.demo.report import stacked
from openrlhf_sapo.demo.study_diagnosis import diagnosis_section
from openrlhf_sapo.demo.study_stats import (RNG_SEED, bootstrap_ci, final_accuracy, late_mean, mean_ci, seeds_needed,
                                          spearman, verdict)

# Paper numbers (SAPO_SPEC section 7: Qwen2.5-VL-7B, Geo3K test accuracy %).
PAPER_GEO3K_7B = {"sapo": 52.75, "grpo": 51.58, "vcppo": 48.75, "ppo": 42.60, "sapo_naive_is": 47.92,
                  "sapo_newline": 41.60, "sapo_step": 41.60, "sapo_lowprob": 44.43}
STAGES = ("early", "middle", "late")
LIFT_PREFIX = "critic/value_jump_lift_q"


# ---------------------------------------------------------------- the runs


def load(out: str) -> Tuple[dict, Dict[str, Dict[str, Dict[int, List[dict]]]]]:
    """study.json and {task: {arm: {seed: metric rows}}} of its finished runs."""
    path = os.path.join(out, "study.json")
    if not os.path.exists(path):
        raise SystemExit(f"no study in {out}: {path} is missing; run `make study` (python -m openrlhf_sapo.demo.study)")
    with open(path) as f:
        summary = json.load(f)
    runs: Dict[str, Dict[str, Dict[int, List[dict]]]] = {}
    for status in summary["runs"].values():
        with open(os.path.join(status["run_dir"], "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        runs.setdefault(status["task"], {}).setdefault(status["arm"], {})[int(status["seed"])] = rows
    return summary, runs


def accuracy_table(arm_runs: Dict[str, Dict[int, List[dict]]], arms: List[str], labels: Dict[str, str],
                   reference: str) -> Tuple[List[str], Dict[str, tuple]]:
    """Markdown rows: accuracy mean [CI], the paper's number, the paired difference to `reference`."""
    lines = ["| arm | seeds | accuracy % (95% CI) | paper (Geo3K, 7B) | paired diff vs "
             f"{labels.get(reference, reference)}, over the seeds both have (95% CI) |", "|---|---|---|---|---|"]
    diffs = {}
    ref = {s: final_accuracy(r) for s, r in arm_runs.get(reference, {}).items()}
    for arm in arms:
        if arm not in arm_runs:
            continue
        acc = {s: final_accuracy(r) for s, r in arm_runs[arm].items()}
        m, lo, hi = mean_ci(list(acc.values()))
        paper = PAPER_GEO3K_7B.get(arm)
        cell = "-"
        if arm != reference:
            paired = [ref[s] - acc[s] for s in acc if s in ref]
            diffs[arm] = (*mean_ci(paired), len(paired), float(np.std(paired, ddof=1)) if len(paired) > 1 else math.nan)
            d, dlo, dhi = diffs[arm][:3]
            cell = f"{d:+.1f}" + (f" [{dlo:+.1f}, {dhi:+.1f}]" if math.isfinite(dlo) else "")
        ci = f" [{lo:.1f}, {hi:.1f}]" if math.isfinite(lo) else ""
        lines.append(f"| {labels.get(arm, arm)} | {len(acc)} | {m:.1f}{ci} | "
                     f"{paper if paper is not None else '-'} | {cell} |")
    return lines, diffs


def stage_of(step: int, last: int) -> str:
    return STAGES[min(2, int(3 * (step - 1) / max(last, 1)))]


def lift_by_stage(arm_seeds: Dict[int, List[dict]]) -> Dict[str, Dict[float, Tuple[float, float, float]]]:
    """Fig. 3: per stage and quantile q, the mean Lift(q) over the stage's steps (all seeds), bootstrap CI."""
    points: Dict[str, Dict[float, List[float]]] = {}
    for rows in arm_seeds.values():
        train = [r for r in rows if r["kind"] == "train"]
        last = max((r["step"] for r in train), default=1)
        for r in train:
            for key, value in r.items():
                if key.startswith(LIFT_PREFIX):
                    q = int(key[len(LIFT_PREFIX):]) / 100
                    points.setdefault(stage_of(r["step"], last), {}).setdefault(q, []).append(value)
    return {stage: {q: bootstrap_ci(v) for q, v in sorted(qs.items())} for stage, qs in points.items()}


def lift_trend(arm_seeds: Dict[int, List[dict]]) -> Tuple[float, Tuple[float, float, float]]:
    """Spearman rho of the step against the mean Lift over q, and a bootstrap CI of the fitted slope."""
    steps, lifts = [], []
    for rows in arm_seeds.values():
        for r in rows:
            values = [v for k, v in r.items() if k.startswith(LIFT_PREFIX)]
            if r["kind"] == "train" and values:
                steps.append(r["step"])
                lifts.append(float(np.mean(values)))
    if len(steps) < 3:
        return math.nan, (math.nan, math.nan, math.nan)
    x, y = np.array(steps, float), np.array(lifts)
    rng = np.random.default_rng(RNG_SEED)
    slopes = []
    for _ in range(1000):
        i = rng.integers(0, len(x), len(x))
        if np.ptp(x[i]) > 0:
            slopes.append(np.polyfit(x[i], y[i], 1)[0])
    slope = float(np.polyfit(x, y, 1)[0]) if np.ptp(x) > 0 else math.nan
    ci = (slope, float(np.percentile(slopes, 2.5)), float(np.percentile(slopes, 97.5))) if slopes else (slope, math.nan, math.nan)
    return spearman(x, y), ci


# ---------------------------------------------------------------- plots


def _band(ax, arm_seeds, key, label, scale=1.0):
    steps, values = stacked(arm_seeds, "train", key)
    if not len(steps):
        return False
    if key == "critic/explained_variance":  # -1e14 when the returns barely vary (all-wrong batches): clip
        values = np.clip(values, -1.0, 1.0)
    mean = scale * values.mean(0)
    ax.plot(steps, mean, label=f"{label} ({values.shape[0]} seeds)")
    if values.shape[0] > 1:
        sd = scale * values.std(0, ddof=1)
        ax.fill_between(steps, mean - sd, mean + sd, alpha=0.2)
    return True


def plot_curves(path: str, arm_runs, arms: List[str], labels, panels: List[Tuple[str, str]], title: str) -> bool:
    fig, axes = figures.subplots(len(panels))
    drawn = False
    for ax, (key, ylabel) in zip(axes, panels):
        for arm in arms:
            if arm in arm_runs:
                drawn |= _band(ax, arm_runs[arm], key, labels.get(arm, arm))
        figures.label(ax, "RL step", ylabel)
    fig.suptitle(title)
    figures.save(fig, path)
    return drawn


def plot_lift(path: str, by_stage, title: str) -> None:
    fig, (ax,) = figures.subplots()
    for stage in STAGES:
        if stage in by_stage:
            qs = sorted(by_stage[stage])
            mean = [by_stage[stage][q][0] for q in qs]
            low = [by_stage[stage][q][1] for q in qs]
            high = [by_stage[stage][q][2] for q in qs]
            ax.plot(qs, mean, marker="o", label=stage)
            ax.fill_between(qs, low, high, alpha=0.2)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    figures.label(ax, "entropy quantile q (tokens with H >= the q-quantile)", "Lift(q) of |V(t+1) - V(t)|", title)
    figures.save(fig, path)


def plot_topk(path: str, arm_runs, title: str) -> None:
    ks, means, lows, highs = [], [], [], []
    for k, arm in ((10, "sapo_top10"), (20, "sapo_top20"), (30, "sapo"), (40, "sapo_top40"), (50, "sapo_top50")):
        if arm in arm_runs:
            m, lo, hi = mean_ci([final_accuracy(r) for r in arm_runs[arm].values()])
            ks.append(k), means.append(m), lows.append(lo if math.isfinite(lo) else m), highs.append(hi if math.isfinite(hi) else m)
    fig, (ax,) = figures.subplots()
    ax.errorbar(ks, means, yerr=[np.subtract(means, lows), np.subtract(highs, means)], marker="o", capsize=3)
    figures.label(ax, "entropy top-k (% of tokens ending a segment)", "held-out accuracy %", title, legend=False)
    figures.save(fig, path)


# ---------------------------------------------------------------- the report


def headline_section(task, arm_runs, labels, plot_dir, median_run_s) -> List[str]:
    lines = [f"### {task}: SAPO against PPO, GRPO, VC-PPO and Soft Adaptive PO (paper Table 1)", ""]
    headline = ["sapo", "ppo", "grpo", "vcppo", "soft_adaptive"]
    n_arms = sum(arm in arm_runs for arm in headline)
    table, diffs = accuracy_table(arm_runs, headline, labels, "sapo")
    lines += table + [""]
    for arm, claim in (("ppo", "paper: SAPO beats PPO by 10.2 points"), ("grpo", "paper: SAPO beats GRPO by 1.2"),
                       ("vcppo", "paper: SAPO beats VC-PPO by 4.0")):
        if arm in diffs:
            d, lo, hi, n, sd = diffs[arm]
            need = seeds_needed(sd)
            lines.append(f"- SAPO vs {labels.get(arm, arm)}: {verdict(lo, hi, n, claim)}."
                         + (f" Telling a 2-point difference at this spread (paired sd {sd:.1f}) takes {need} seeds: "
                            f"{need} x {n_arms} headline arms x {median_run_s:.0f} s = "
                            f"{need * n_arms * median_run_s / 3600:.1f} h for this task on this machine." if need else ""))
    if "soft_adaptive" in diffs:
        d, lo, hi, n, _ = diffs["soft_adaptive"]
        lines.append(f"- Soft Adaptive PO (a different algorithm that shares the name) vs SAPO: paired difference "
                     f"{d:+.1f} (no published number on this benchmark).")
    lines.append("")
    for name, arms, panels, title in (
        ("fig6", ["sapo", "vcppo"], [("critic_loss", "value loss"), ("critic/explained_variance", "explained variance (clipped to [-1, 1])")],
         "Fig. 6: critic, SAPO vs VC-PPO"),
        ("fig7", ["sapo", "ppo"], [("policy_entropy", "policy entropy (nats/token)"),
                                   ("rollout/response_length_mean", "response length (tokens)")],
         "Fig. 7: policy entropy and response length, SAPO vs PPO"),
    ):
        path = os.path.join(plot_dir, f"{task}_{name}.png")
        if plot_curves(path, arm_runs, arms, labels, panels, f"{task} - {title}"):
            lines += [f"![{title}](plots/{os.path.basename(path)})", ""]
    if "sapo" in arm_runs and "vcppo" in arm_runs:
        ours, theirs = late_mean(arm_runs["sapo"], "critic_loss"), late_mean(arm_runs["vcppo"], "critic_loss")
        paired = [theirs[s] - ours[s] for s in ours if s in theirs]
        _, lo, hi = mean_ci(paired)
        lines.append(f"- Fig. 6, SAPO's critic converges lower than VC-PPO's (last third of training): "
                     f"{verdict(lo, hi, len(paired), 'paper: lower and steadier')}. SAPO's value loss is over "
                     "segment boundaries only, VC-PPO's over every token: read it with the explained variance.")
    lines.append("")
    return lines


def lift_section(task, arm_runs, labels, plot_dir) -> List[str]:
    lines = [f"### {task}: Fig. 3, Lift(q) of the value jump at high-entropy tokens", ""]
    for arm in ("sapo", "ppo", "vcppo"):
        if arm not in arm_runs:
            continue
        by_stage = lift_by_stage(arm_runs[arm])
        if not by_stage:
            continue
        path = os.path.join(plot_dir, f"{task}_fig3_lift_{arm}.png")
        plot_lift(path, by_stage, f"{task}, {labels.get(arm, arm)}: Lift(q) per training stage")
        lines += [f"**{labels.get(arm, arm)}**", "", f"![Fig. 3 {arm}](plots/{os.path.basename(path)})", "",
                  "| stage | " + " | ".join(f"q={q:g}" for q in sorted(next(iter(by_stage.values())))) + " |",
                  "|---|" + "---|" * len(next(iter(by_stage.values())))]
        for stage in STAGES:
            if stage in by_stage:
                cells = [f"{m:.2f} [{lo:.2f}, {hi:.2f}]" if math.isfinite(lo) else f"{m:.2f}"
                         for m, lo, hi in by_stage[stage].values()]
                lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        last_stage = max(by_stage, key=STAGES.index)  # "late" unless the run is too short for three stages
        late = by_stage[last_stage]
        top_q, top = max(late.items())
        rho, (slope, slo, shi) = lift_trend(arm_runs[arm])
        _, low, high = top
        above = ("holds (the interval is above 1)" if low > 1 else "does not hold (the interval is below 1)"
                 if high < 1 else "cannot tell (the interval spans 1)") if math.isfinite(low) else "cannot tell (no interval)"
        grows = late[min(late)][0] < top[0]
        lines += ["", f"- {labels.get(arm, arm)}: Lift > 1 at q={top_q:g} in the {last_stage} stage: "
                  + above + f"; Lift grows with q: {'yes' if grows else 'no'} ({last_stage} stage); "
                  f"the mean Lift over training: Spearman rho {rho:.2f}, slope {slope:+.4f}/step "
                  + (f"[{slo:+.4f}, {shi:+.4f}]" if math.isfinite(slo) else "") + " (paper: rho 0.15, slope CI above 0).", ""]
    return lines


def ablation_section(task, arm_runs, labels, plot_dir) -> List[str]:
    lines = []
    for title, arms, claims in (
        ("Fig. 5: the entropy top-k sweep", ["sapo", "sapo_top10", "sapo_top20", "sapo_top40", "sapo_top50"],
         "paper: best at 30%, worse at 10% and above 30%"),
        ("Table 2: segment ratio vs naive IS (token ratio, segment advantages)", ["sapo", "sapo_naive_is"],
         "paper: 52.75 vs 47.92"),
        ("Table 3: where segments are cut", ["sapo", "sapo_newline", "sapo_step", "sapo_lowprob", "sapo_fixed"],
         "paper: entropy 52.75, newline 41.60, step 41.60, low-probability 44.43"),
        ("The segment value read at its start (the paper's s_m) vs its end (the release)", ["sapo", "sapo_value_start"],
         "no published comparison"),
    ):
        present = [a for a in arms if a in arm_runs]
        if len(present) < 2:
            continue
        # an ablation is read over the seeds every arm of its table has (SAPO may have more: the headline's)
        common = set.intersection(*(set(arm_runs[a]) for a in present))
        table, diffs = accuracy_table({a: {s: arm_runs[a][s] for s in common} for a in present}, present, labels, "sapo")
        lines += [f"### {task}: {title}", ""] + table + [""]
        if "sapo_top10" in present:
            path = os.path.join(plot_dir, f"{task}_fig5_topk.png")
            plot_topk(path, arm_runs, f"{task}: Fig. 5, accuracy against the entropy top-k")
            lines += [f"![Fig. 5](plots/{os.path.basename(path)})", ""]
        for arm, (d, lo, hi, n, _) in diffs.items():
            lines.append(f"- SAPO (entropy, top 30%, value at end) vs {labels.get(arm, arm)}: "
                         f"{verdict(lo, hi, n, claims)}.")
        lines.append("")
    return lines


def write_accuracy_csv(path: str, runs) -> None:
    """task, arm, seed, final held-out accuracy: one row per run, for anyone re-analysing without the runs."""
    with open(path, "w") as f:
        f.write("task,arm,seed,accuracy_percent\n")
        for task, arm_runs in runs.items():
            for arm, seeds in arm_runs.items():
                for seed, rows in sorted(seeds.items()):
                    f.write(f"{task},{arm},{seed},{final_accuracy(rows):.4g}\n")


def write_report(out: str) -> str:
    summary, runs = load(out)
    labels = summary["labels"]
    plot_dir = os.path.join(out, "plots")
    os.makedirs(plot_dir, exist_ok=True)
    seconds = [r["seconds"] for r in summary["runs"].values()]
    median_run_s = float(np.median(seconds)) if seconds else 0.0
    cfg = summary["config"]
    per_task = {task: sum(len(seeds) for seeds in arm_runs.values()) for task, arm_runs in runs.items()}
    lines = [
        "# SAPO's claims at small scale", "",
        f"`{summary.get('command', 'python -m openrlhf_sapo.demo.study')}` (with the runs of earlier invocations in "
        f"the same folder): {len(summary['runs'])} runs ("
        + ", ".join(f"{task} {n}" for task, n in per_task.items())
        + f"; {len(summary['arms'])} arms, seeds per arm in the tables), {cfg['steps']} RL steps of "
        f"{cfg['samples_per_step']} samples each; {sum(seconds) / 3600:.1f} h of runs on this machine "
        f"(2 cores; median run {median_run_s:.0f} s){'' if summary.get('finished') else ', UNFINISHED: the tables hold the runs so far'}.",
        "",
        "Paired design: for each seed every arm starts from the task's warm start and sees the same prompt order; "
        "differences are per seed, then averaged, with a 95% Student t interval. Accuracy is greedy pass@1 on the "
        "held-out problems at the last step. The paper's numbers are Qwen2.5-VL-7B on Geo3K (SAPO_SPEC section 7): "
        "they are there for direction, not for level (a tiny model on a toy task).",
        "",
    ]
    for task, arm_runs in runs.items():
        lines += [f"## Task: {task}", ""]
        lines += headline_section(task, arm_runs, labels, plot_dir, median_run_s)
        lines += lift_section(task, arm_runs, labels, plot_dir)
        lines += ablation_section(task, arm_runs, labels, plot_dir)
    lines += diagnosis_section(runs, labels, plot_dir)
    write_accuracy_csv(os.path.join(out, "final_accuracy.csv"), runs)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/study")
    print(write_report(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
