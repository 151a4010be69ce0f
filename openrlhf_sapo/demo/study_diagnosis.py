"""Item 4 of the study's report: where SAPO loses to a method the paper says it beats, the measurements that
say why. Each candidate cause is read off the study's runs:

- critic quality: each critic's explained variance of its value targets and its value loss over the last
  third of training, per task (the same method on two tasks is the clean comparison: PPO and SAPO train
  their critics on different positions, every token vs segment ends, so their levels differ by design);
- budget: the paired accuracy gap at every evaluation step (a gap that shrinks with steps is a budget
  effect; a gap that is there from the first evaluation is not);
- the interventions (study.py's critic_warmup and budget groups): critic-only warm-up steps before the same
  actor steps, and twice the steps, each paired with the arm it changes;
- segment placement: the spread of Table 3's segmenters (if no placement beats another, where segments
  are cut is not what decides the result at this scale).
"""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import numpy as np

from openrlhf_sapo.demo import figures
from openrlhf_sapo.demo.study_stats import accuracy_by_step, final_accuracy, late_mean, mean_ci, verdict

CRITIC_ARMS = ("ppo", "vcppo", "sapo", "ppo_critic_warmup", "sapo_critic_warmup", "ppo_long", "sapo_long")
# The interventions (study.py's critic_warmup and budget groups): (arm, against, what a positive difference says)
INTERVENTIONS = (
    ("sapo_critic_warmup", "sapo", "a critic-only head start helps SAPO"),
    ("ppo_critic_warmup", "ppo", "a critic-only head start helps PPO"),
    ("sapo_critic_warmup", "grpo", "SAPO with a warmed-up critic beats GRPO"),
    ("sapo_long", "sapo", "twice the steps help SAPO"),
    ("grpo_long", "grpo", "twice the steps help GRPO"),
    ("sapo_long", "grpo_long", "at twice the steps SAPO beats GRPO"),
    ("sapo_long", "ppo_long", "at twice the steps SAPO beats PPO"),
    # is it SAPO, or every critic? the critic methods against GRPO
    ("ppo", "grpo", "PPO beats GRPO"),
    ("vcppo", "grpo", "VC-PPO beats GRPO"),
    ("ppo_long", "grpo_long", "at twice the steps PPO beats GRPO"),
)
EXPLAINED_VARIANCE = "critic/explained_variance"
SEGMENTER_ARMS = ("sapo", "sapo_newline", "sapo_step", "sapo_lowprob", "sapo_fixed")


def late_explained_variance(arm_seeds: Dict[int, List[dict]]) -> Dict[int, float]:
    """Per seed, the mean explained variance over the last third of training, each step clipped to
    [-1, 1] first (a batch whose returns barely vary, all answers wrong, gives -1e14)."""
    return late_mean(arm_seeds, EXPLAINED_VARIANCE, clip=(-1.0, 1.0))


def _cell(values) -> str:
    m, lo, hi = mean_ci(list(values))
    if not math.isfinite(m):
        return "-"
    return f"{m:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if math.isfinite(lo) else "")


def critic_quality(runs: Dict[str, Dict[str, Dict[int, List[dict]]]], labels) -> Tuple[List[str], Dict]:
    """A table over tasks of each critic arm's late explained variance and value loss; and the per-task
    means {(task, arm): explained variance}."""
    lines = ["| task | critic arm | explained variance, last third (95% CI) | value loss, last third (95% CI) |",
             "|---|---|---|---|"]
    means = {}
    for task, arm_runs in runs.items():
        for arm in CRITIC_ARMS:
            if arm not in arm_runs:
                continue
            ev = late_explained_variance(arm_runs[arm])
            means[(task, arm)] = float(np.mean(list(ev.values()))) if ev else math.nan
            lines.append(f"| {task} | {labels.get(arm, arm)} | {_cell(ev.values())} | "
                         f"{_cell(late_mean(arm_runs[arm], 'critic_loss').values())} |")
    return lines, means


def gap_over_training(arm_runs, arm: str, reference: str = "sapo") -> List[Tuple[int, float, float, float, int]]:
    """(step, mean, low, high, seeds) of the paired accuracy difference reference - arm at each evaluation."""
    ref = {s: accuracy_by_step(r) for s, r in arm_runs.get(reference, {}).items()}
    other = {s: accuracy_by_step(r) for s, r in arm_runs.get(arm, {}).items()}
    seeds = sorted(set(ref) & set(other))
    steps = sorted(set.intersection(*(set(ref[s]) & set(other[s]) for s in seeds))) if seeds else []
    return [(step, *mean_ci([ref[s][step] - other[s][step] for s in seeds]), len(seeds)) for step in steps]


def plot_accuracy(path: str, arm_runs, arms, labels, title: str) -> bool:
    fig, (ax,) = figures.subplots(width=5.5)
    drawn = False
    for arm in arms:
        per_seed = [accuracy_by_step(r) for r in arm_runs.get(arm, {}).values()]
        per_seed = [p for p in per_seed if p]
        if not per_seed:
            continue
        steps = sorted(set.intersection(*(set(p) for p in per_seed)))
        values = np.array([[p[s] for s in steps] for p in per_seed])
        mean = values.mean(0)
        ax.plot(steps, mean, marker="o", label=f"{labels.get(arm, arm)} ({len(per_seed)} seeds)")
        if len(per_seed) > 1:
            half = 1.96 * values.std(0, ddof=1) / math.sqrt(len(per_seed))
            ax.fill_between(steps, mean - half, mean + half, alpha=0.15)
        drawn = True
    figures.label(ax, "RL step", "held-out accuracy % (mean, ~95% band)", title)
    figures.save(fig, path)
    return drawn


def budget_lines(task, arm_runs, labels, plot_dir) -> List[str]:
    lines = []
    path = os.path.join(plot_dir, f"{task}_accuracy_over_training.png")
    if plot_accuracy(path, arm_runs, ("sapo", "ppo", "grpo", "vcppo", "soft_adaptive"), labels,
                     f"{task}: held-out accuracy over training"):
        lines += [f"![accuracy over training](plots/{os.path.basename(path)})", ""]
    gaps = {arm: gap_over_training(arm_runs, arm) for arm in ("ppo", "grpo") if arm in arm_runs}
    gaps = {arm: g for arm, g in gaps.items() if g}
    if not gaps:
        return lines
    steps = sorted(set.intersection(*(set(p[0] for p in g) for g in gaps.values())))
    lines += ["| step | " + " | ".join(f"SAPO - {labels.get(a, a)} (95% CI)" for a in gaps) + " |",
              "|---|" + "---|" * len(gaps)]
    for step in steps:
        cells = []
        for g in gaps.values():
            _, m, lo, hi, _ = next(p for p in g if p[0] == step)
            cells.append(f"{m:+.1f}" + (f" [{lo:+.1f}, {hi:+.1f}]" if math.isfinite(lo) else ""))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("")
    for arm, g in gaps.items():
        trained = [p for p in g if p[0] > 0]
        if len(trained) >= 2:
            first, last = trained[0], trained[-1]
            trend = np.polyfit([p[0] for p in trained], [p[1] for p in trained], 1)[0]
            lines.append(f"- SAPO - {labels.get(arm, arm)}: {first[1]:+.1f} at step {first[0]}, {last[1]:+.1f} at step "
                         f"{last[0]} (fitted trend {trend:+.2f} points/step over the evaluations after step 0).")
    return lines + [""]


def intervention_lines(task, arm_runs, labels) -> List[str]:
    rows = []
    for arm, against, claim in INTERVENTIONS:
        if arm not in arm_runs or against not in arm_runs:
            continue
        ours = {s: final_accuracy(r) for s, r in arm_runs[arm].items()}
        theirs = {s: final_accuracy(r) for s, r in arm_runs[against].items()}
        paired = [ours[s] - theirs[s] for s in ours if s in theirs]
        m, lo, hi = mean_ci(paired)
        rows.append(f"| {labels.get(arm, arm)} - {labels.get(against, against)} | {len(paired)} | {m:+.1f}"
                    + (f" [{lo:+.1f}, {hi:+.1f}]" if math.isfinite(lo) else "") + f" | {verdict(lo, hi, len(paired), claim)} |")
    if not rows:
        return []
    return [f"### {task}: interventions (critic warm-up, twice the budget) and the critic methods against GRPO", "",
            "| paired comparison | seeds | accuracy difference, points (95% CI) | verdict |", "|---|---|---|---|",
            *rows, ""]


def placement_lines(task, arm_runs, labels) -> List[str]:
    finals = {}
    for arm in SEGMENTER_ARMS:
        if arm in arm_runs:
            finals[arm] = float(np.nanmean([final_accuracy(r) for r in arm_runs[arm].values()]))
    if len(finals) < 3:
        return []
    best, worst = max(finals, key=finals.get), min(finals, key=finals.get)
    return [f"- Segment placement ({task}): the segmenters' mean accuracies span {finals[worst]:.1f} "
            f"({labels.get(worst, worst)}) to {finals[best]:.1f} ({labels.get(best, best)}); Table 3 above gives "
            "their paired intervals.", ""]


def diagnosis_section(runs, labels, plot_dir) -> List[str]:
    """The report's last section: critic quality across tasks, the gap over training, segment placement."""
    lines = ["## Why SAPO wins or loses here (item 4: critic quality, budget, segment placement)", "",
             "### Critic quality, per task", ""]
    table, ev = critic_quality(runs, labels)
    lines += table + [""]
    tasks = list(runs)
    for arm in CRITIC_ARMS:
        values = {t: ev[(t, arm)] for t in tasks if (t, arm) in ev and math.isfinite(ev[(t, arm)])}
        if len(values) >= 2:
            low, high = min(values, key=values.get), max(values, key=values.get)
            lines.append(f"- {labels.get(arm, arm)}: its critic explains {values[high]:.2f} of its targets' variance "
                         f"on {high} and {values[low]:.2f} on {low} (late training, mean over seeds).")
    lines += ["", "Levels across arms are not comparable (PPO's and VC-PPO's critics are scored on every token, "
              "SAPO's on the segment ends it is trained on); the same arm across tasks is.", ""]
    for task, arm_runs in runs.items():
        lines += [f"### {task}: the accuracy gap over training (budget)", ""]
        lines += budget_lines(task, arm_runs, labels, plot_dir)
        lines += intervention_lines(task, arm_runs, labels)
        lines += placement_lines(task, arm_runs, labels)
    return lines
