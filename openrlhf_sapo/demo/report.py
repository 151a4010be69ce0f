"""The demo's report: `<out>/report.md` and `<out>/plots/*.png` from every run's metrics.jsonl.

`python -m openrlhf_sapo.demo.report --out runs/demo` rewrites it from the runs that finished so far
(the demo rewrites `<out>/summary.json` after every run, so an interrupted demo can be reported). The findings
are computed from the numbers (which method ends highest, whether the gap exceeds the spread over
seeds, SAPO's step time relative to PPO's), never written in advance.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
from typing import Dict, List, Optional

import numpy as np

METHOD_ORDER = ("ppo", "grpo", "sapo")
COLORS = {"ppo": "tab:blue", "grpo": "tab:orange", "sapo": "tab:green"}
LABELS = {"ppo": "PPO", "grpo": "GRPO", "sapo": "SAPO"}

CRITIC_CURVES = ("value_loss", "explained_variance")
TRAIN_CURVES = {  # plot name -> (metric key, y label)
    "reward": ("rollout/reward_mean", "training reward (mean per step)"),
    "value_loss": ("critic_loss", "critic (value) loss"),
    "explained_variance": ("critic/explained_variance", "critic explained variance of its targets"),
    "response_length": ("rollout/response_length_mean", "response length (tokens)"),
    "entropy": ("policy_entropy", "policy entropy on its samples (nats/token)"),
}


def load_summary(out: str) -> dict:
    path = os.path.join(out, "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"no demo in {out}: {path} is missing (the demo writes it once its set-up is done). "
                         "Run `make demo` (or python -m openrlhf_sapo.demo --out OUT) first.")
    with open(path) as f:
        return json.load(f)


def load_runs(out: str) -> Dict[str, Dict[int, List[dict]]]:
    """{method: {seed: [rows]}} from the finished runs listed in <out>/summary.json."""
    summary = load_summary(out)
    runs: Dict[str, Dict[int, List[dict]]] = {}
    for status in summary["runs"].values():
        path = os.path.join(status["run_dir"], "metrics.jsonl")
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        runs.setdefault(status["method"], {})[int(status["seed"])] = rows
    return runs


def eval_key(rows: List[dict]) -> Optional[str]:
    for row in rows:
        if row["kind"] == "eval":
            keys = sorted(k for k in row if k.startswith("eval_") and k.endswith("_pass1"))
            if keys:
                return keys[0]
    return None


def curve(rows: List[dict], kind: str, key: str):
    points = [(r["step"], r[key]) for r in rows if r["kind"] == kind and isinstance(r.get(key), (int, float))]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)


def stacked(seed_rows: Dict[int, List[dict]], kind: str, key: str):
    """Steps common to every seed, and the [seeds, steps] values there."""
    curves = [curve(rows, kind, key) for rows in seed_rows.values()]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return np.array([]), np.zeros((0, 0))
    steps = sorted(set.intersection(*(set(c[0].tolist()) for c in curves)))
    values = np.array([[dict(zip(c[0].tolist(), c[1].tolist()))[s] for s in steps] for c in curves])
    return np.array(steps), values


def _mean_spread(values: np.ndarray) -> str:
    if values.size == 0:
        return "n/a"
    if values.size == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f}"


def summarize(runs) -> Dict[str, dict]:
    table = {}
    for method in [m for m in METHOD_ORDER if m in runs]:
        seed_rows = runs[method]
        key = eval_key(next(iter(seed_rows.values())))
        steps, acc = stacked(seed_rows, "eval", key) if key else (np.array([]), np.zeros((0, 0)))
        step_times = [r["timing/step_total"] for rows in seed_rows.values() for r in rows
                      if r["kind"] == "train" and "timing/step_total" in r]
        rewards = [curve(rows, "train", "rollout/reward_mean")[1] for rows in seed_rows.values()]
        tokens = []
        for rows in seed_rows.values():
            train = [r for r in rows if r["kind"] == "train"]
            tokens.append(sum(r.get("rollout/response_length_mean", 0) * r.get("rollout/num_samples", 0) for r in train))
        table[method] = {
            "seeds": len(seed_rows),
            "start": acc[:, 0] if acc.size else np.array([]),
            "final": acc[:, -1] if acc.size else np.array([]),
            "best": acc.max(1) if acc.size else np.array([]),
            "last_reward": np.array([r[-5:].mean() for r in rewards if len(r)]),
            "step_seconds": float(np.median(step_times)) if step_times else float("nan"),
            "train_tokens": float(np.mean(tokens)) if tokens else 0.0,
            "eval_steps": steps,
            "eval_key": key,
        }
    return table


def findings(table: Dict[str, dict]) -> List[str]:
    lines = []
    finals = {m: round(100 * t["final"].mean(), 1) for m, t in table.items() if t["final"].size}
    if len(finals) > 1 and len(set(finals.values())) == 1:
        lines.append(f"Every method ends at the same held-out accuracy ({next(iter(finals.values())):.1f}%): no ranking.")
    elif finals:
        top = max(finals.values())
        best = [LABELS[m] for m, v in finals.items() if v == top]
        lines.append(f"Highest final held-out accuracy: {' and '.join(best)} ({top:.1f}%).")
    if "sapo" in table and table["sapo"]["final"].size:
        sapo = table["sapo"]["final"]
        for base in ("ppo", "grpo"):
            if base not in table or not table[base]["final"].size:
                continue
            other = table[base]["final"]
            gap = sapo.mean() - other.mean()
            spread = max(sapo.std(ddof=1) if sapo.size > 1 else 0.0, other.std(ddof=1) if other.size > 1 else 0.0)
            if sapo.size < 2 or other.size < 2:
                verdict = "one seed each: no spread to compare the gap with"
            elif abs(gap) > 2 * spread:
                verdict = "larger than twice the seed spread"
            else:
                verdict = f"within twice the seed spread ({100 * spread:.1f} points): not a clear difference"
            word = "above" if gap > 0 else "below" if gap < 0 else "equal to"
            lines.append(f"SAPO ends {100 * abs(gap):.1f} points {word} {LABELS[base]} ({verdict}).")
        start = table["sapo"]["start"].mean()
        lines.append(f"SAPO moved held-out accuracy from {100 * start:.1f}% to {100 * sapo.mean():.1f}% "
                     f"(warm start to last evaluation).")
    if "sapo" in table and "ppo" in table:
        ratio = table["sapo"]["step_seconds"] / table["ppo"]["step_seconds"]
        lines.append(f"SAPO's median wall time per step is {ratio:.2f}x PPO's "
                     f"({table['sapo']['step_seconds']:.2f} s vs {table['ppo']['step_seconds']:.2f} s).")
    return lines


def analysis_findings(analysis: Dict[str, dict]) -> List[str]:
    """What the segment/error analysis says about SAPO's premise on this task."""
    lines = []
    for title, result in analysis.items():
        roles = result["roles"]
        cut_at = sorted((r for r in roles if r != "end" and roles[r]["lift"] > 1.5 and roles[r]["token_share"] >= 0.01),
                        key=lambda r: -roles[r]["lift"])
        if cut_at:
            share = sum(roles[r]["end_share"] for r in cut_at)
            lines.append(f"{title}: {100 * share:.0f}% of segment ends fall on {', '.join(cut_at)} tokens "
                         f"(lift {min(roles[r]['lift'] for r in cut_at):.1f}-{max(roles[r]['lift'] for r in cut_at):.1f}); "
                         "markup, newlines and commas are almost never cut.")
        stepwise = result["errors"].get("misread", 0) + result["errors"].get("arithmetic", 0)
        if result["wrong"]:
            lines.append(f"{title}: {100 * stepwise:.0f}% of the wrong answers first go wrong in one reading or "
                         "arithmetic step, so the outcome's credit belongs to identifiable steps.")
    return lines


# --------------------------------------------------------------------------------------------------
# Plots


def _plot_band(ax, steps, values, method):
    mean = values.mean(0)
    ax.plot(steps, mean, color=COLORS[method], label=f"{LABELS[method]} (n={values.shape[0]})")
    if values.shape[0] > 1:
        ax.fill_between(steps, values.min(0), values.max(0), color=COLORS[method], alpha=0.2)


def plot_all(runs, table, plot_dir: str) -> Dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(plot_dir, exist_ok=True)
    paths = {}

    def save(fig, name):
        path = os.path.join(plot_dir, f"{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[name] = path

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, t in table.items():
        if t["eval_key"]:
            steps, values = stacked(runs[method], "eval", t["eval_key"])
            _plot_band(ax, steps, 100 * values, method)
    ax.set(xlabel="RL step", ylabel="held-out accuracy (%, greedy)", title="Held-out accuracy (mean, band = min-max over seeds)")
    ax.legend()
    save(fig, "accuracy")

    for name, (key, ylabel) in TRAIN_CURVES.items():
        methods = [m for m in table if name not in CRITIC_CURVES or m in ("ppo", "sapo")]
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for method in methods:
            steps, values = stacked(runs[method], "train", key)
            if values.size:
                _plot_band(ax, steps, values, method)
                drawn = True
        ax.set(xlabel="RL step", ylabel=ylabel, title=ylabel[0].upper() + ylabel[1:])
        if drawn:
            ax.legend()
        save(fig, name)

    if "sapo" in runs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (key, label) in zip(axes, (("sapo/segments_per_response", "segments per response"),
                                           ("sapo/segment_length_mean", "mean segment length (tokens)"))):
            steps, values = stacked(runs["sapo"], "train", key)
            if values.size:
                _plot_band(ax, steps, values, "sapo")
            ax.set(xlabel="RL step", ylabel=label, title=f"SAPO: {label}")
        save(fig, "segments")
    return paths


# --------------------------------------------------------------------------------------------------
# Markdown


def write_report(out: str) -> str:
    summary = load_summary(out)
    if not summary["runs"]:
        raise SystemExit(f"no finished run in {out} yet: nothing to report")
    runs = load_runs(out)
    table = summarize(runs)
    plots = plot_all(runs, table, os.path.join(out, "plots"))
    config = summary["config"]
    warm = summary.get("warm_start", {})
    lines = [
        f"# SAPO demo: PPO vs GRPO vs SAPO on `{summary['task']}` ({summary['preset']} preset)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}. "
        f"Set-up (tiny model + warm start + data): {summary['setup_seconds']:.0f} s; "
        + (f"everything: {summary['total_seconds'] / 60:.1f} min." if summary.get("finished") else
           f"**unfinished demo**: {len(summary['runs'])} of "
           f"{len(summary.get('methods', METHOD_ORDER)) * len(config['seeds'])} runs done (rerun the demo to finish it)."),
        "",
        "Numerics pinned for reproducibility (demo/numerics.py): "
        + ", ".join(f"{k}={v}" for k, v in summary.get("numerics", {}).items()) + ".",
        "",
        f"Each run: {config['steps']} RL steps of {config['samples_per_step']} sampled responses "
        f"(GRPO: {config['samples_per_step'] // config['grpo_group']} prompts x {config['grpo_group']}), "
        f"{config['updates_per_step']} optimizer steps per RL step, held-out greedy evaluation on "
        f"{config['eval_n']} problems every {config['eval_every']} steps. Seeds: {', '.join(map(str, config['seeds']))}.",
        "",
        f"Warm start (supervised, {config['warm_steps']} steps): held-out accuracy "
        f"{100 * warm.get('eval_accuracy', float('nan')):.1f}%, boxed answers {100 * warm.get('eval_boxed_rate', float('nan')):.0f}%.",
        "",
        "## Held-out accuracy (%)",
        "",
        "| method | seeds | start | final (mean ± sd) | best during run | last-5-step train reward | responses' tokens | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, t in table.items():
        lines.append(
            f"| {LABELS[method]} | {t['seeds']} | {_mean_spread(t['start'])} | {_mean_spread(t['final'])} | "
            f"{_mean_spread(t['best'])} | {_mean_spread(t['last_reward'])} | {t['train_tokens']:.0f} | {t['step_seconds']:.2f} |"
        )
    found = findings(table) + analysis_findings(summary.get("analysis") or {})
    lines += ["", "## What this run found", ""] + [f"- {line}" for line in found]
    if summary.get("analysis"):
        from openrlhf_sapo.demo.analysis import markdown

        lines += ["", "## Where SAPO cuts, and where the errors are", "",
                  "Lift = share of segment ends / share of tokens for each token role (> 1: the entropy "
                  "segmenter cuts there more than at random). Step-wise credit helps when the errors sit in "
                  "identifiable steps and the cuts fall at the tokens that decide them.", ""]
        for title, result in summary["analysis"].items():
            lines += markdown(result, title) + [""]
    lines += ["", "## Plots", ""]
    captions = {
        "accuracy": "Held-out accuracy vs step",
        "reward": "Training reward vs step",
        "value_loss": "Value loss: PPO averages over every response token, SAPO over segment ends only "
                      "(the high-entropy tokens, where values are hardest), so the levels are not comparable",
        "explained_variance": "Critic explained variance (1 - Var(return - value) / Var(return)) on the positions "
                              "each critic is trained on: PPO every token, SAPO the segment ends",
        "response_length": "Response length",
        "entropy": "Policy entropy",
        "segments": "SAPO segments per response and segment length",
    }
    for name, path in plots.items():
        lines += [f"### {captions.get(name, name)}", "", f"![{name}]({os.path.relpath(path, out)})", ""]
    lines += ["## Reproduce", "", "Everything: `make demo` (or `python -m openrlhf_sapo.demo"
              + (" --quick" if summary["preset"] == "quick" else "") + f" --task {summary['task']}`). "
              "Each run's exact command is saved beside its outputs; `bash <run>/command.sh` repeats it.", "",
              "| run | seconds | command |", "|---|---|---|"]
    for name, status in summary["runs"].items():
        command = os.path.join(status["run_dir"], "command.sh")
        lines.append(f"| {name} | {status['seconds']:.0f} | `{os.path.relpath(command, out)}` |")
    if summary.get("method_flags"):
        lines += ["", "What sets the methods apart (the other flags are shared):", ""]
        for method, flags in summary["method_flags"].items():
            lines.append(f"- {LABELS[method]}: `{shlex.join(flags)}`")
    lines += ["", "Metrics of every run: `<run>/metrics.jsonl`, `tensorboard --logdir " + shlex.quote(os.path.join(out, "runs")) + "`."]
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_sapo.demo.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/demo")
    print(write_report(parser.parse_args(argv).out))


if __name__ == "__main__":
    main()
