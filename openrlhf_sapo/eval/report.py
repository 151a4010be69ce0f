"""Metrics per benchmark and the markdown tables (shaped like the paper's Table 1).

Metrics (fractions in [0, 1] in results.json, percent in table.md):

* ``accuracy``: mean correctness over all samples of all prompts (with n samples per prompt this is
  mean@n; it is also written as ``mean@<n>`` when n > 1);
* ``pass@<n>`` (n > 1): fraction of prompts with at least one correct sample;
* ``extraction_failure_rate``: fraction of samples without a complete ``\\boxed{}`` answer (they
  score 0);
* ``truncated_rate`` / ``mean_response_tokens`` when the backend reports token counts;
* ``count`` (prompts) and ``n_samples`` (samples per prompt).
"""

from __future__ import annotations

from typing import Optional

from openrlhf_sapo.eval.benchmarks import TEXT_BENCHMARKS, VLM_BENCHMARKS

# SAPO_SPEC.md section 7: the paper's Table 1 (accuracy %, Qwen2.5-VL-{3B,7B}-Instruct trained on
# Geo3K train only). Each row: (method, values in VLM_BENCHMARKS order, published Avg).
PAPER_TABLE1 = {
    "7b": [
        ("base", (42.60, 39.15, 30.58, 32.67, 69.30, 13.37), 37.94),
        ("GRPO", (51.58, 45.86, 44.80, 41.05, 69.70, 22.75), 45.96),
        ("PPO", (42.60, 42.73, 39.72, 41.52, 69.80, 17.96), 42.39),
        ("VC-PPO", (48.75, 45.41, 41.37, 40.48, 68.40, 20.76), 44.20),
        ("SAPO", (52.75, 47.30, 45.81, 42.86, 70.70, 21.96), 46.90),
    ],
    "3b": [
        ("base", (27.29, 34.45, 24.75, 21.81, 61.60, 10.97), 30.15),
        ("GRPO", (40.60, 40.72, 36.67, 29.43, 63.00, 17.37), 37.97),
        ("PPO", (21.80, 39.15, 26.52, 25.90, 63.80, 9.98), 31.19),
        ("VC-PPO", (34.94, 37.81, 32.36, 32.67, 62.90, 10.78), 35.24),
        ("SAPO", (46.26, 39.60, 37.56, 36.19, 65.40, 16.37), 40.23),
    ],
}


def benchmark_metrics(per_prompt: list, n_samples: int) -> dict:
    """`per_prompt`: for each prompt, its samples as dicts with `correct` (bool), `extracted` (str or
    None) and optionally `num_tokens` / `truncated`."""
    samples = [s for prompt in per_prompt for s in prompt]
    if not samples:
        raise ValueError("no samples to summarize")
    correct = [1.0 if s["correct"] else 0.0 for s in samples]
    out = {
        "count": len(per_prompt),
        "n_samples": n_samples,
        "num_generations": len(samples),
        "accuracy": sum(correct) / len(samples),
    }
    if n_samples > 1:
        out[f"mean@{n_samples}"] = out["accuracy"]
        out[f"pass@{n_samples}"] = sum(1.0 for p in per_prompt if any(s["correct"] for s in p)) / len(per_prompt)
    out["extraction_failure_rate"] = sum(1.0 for s in samples if s["extracted"] is None) / len(samples)
    tokens = [s.get("num_tokens") for s in samples]
    if all(t is not None for t in tokens):
        out["mean_response_tokens"] = sum(tokens) / len(tokens)
    truncated = [s.get("truncated") for s in samples]
    if all(t is not None for t in truncated):
        out["truncated_rate"] = sum(1.0 for t in truncated if t) / len(truncated)
    return out


def average(metrics: dict, names) -> Optional[dict]:
    """Mean accuracy over the benchmarks of `names` that were evaluated; None when none was."""
    present = [n for n in names if n in metrics]
    if not present:
        return None
    return {"accuracy": sum(metrics[n]["accuracy"] for n in present) / len(present), "benchmarks": present}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100.0 * x:.2f}"


def _row(name: str, cells: list) -> str:
    return "| " + " | ".join([name] + cells) + " |"


def _header(columns) -> list:
    cols = ["Model"] + list(columns)
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _table(title: str, columns, metrics: dict, label: str, paper_rows=(), with_avg: bool = True) -> list:
    lines = [f"## {title}", ""] + _header(list(columns) + (["Avg"] if with_avg else []))
    for name, values, avg in paper_rows:
        lines.append(_row(name, [f"{v:.2f}" for v in values] + ([f"{avg:.2f}"] if with_avg else [])))
    cells = [_pct(metrics[c]["accuracy"]) if c in metrics else "-" for c in columns]
    if with_avg:
        avg = average(metrics, columns)
        cells.append(_pct(avg["accuracy"]) if avg else "-")
    lines.append(_row(label, cells))
    lines.append("")
    return lines


def _avg_note(columns, metrics: dict, label: str, paper_rows=()) -> list:
    present = [c for c in columns if c in metrics]
    missing = [c for c in columns if c not in metrics]
    if not missing:
        return [f"Avg: mean of the {len(columns)} columns."]
    lines = [
        f"Avg of {label}: over the {len(present)} benchmark(s) evaluated ({', '.join(present) or 'none'}); "
        f"\"-\" = not evaluated ({', '.join(missing)}), excluded from Avg."
    ]
    if paper_rows and present:
        idx = [list(columns).index(c) for c in present]
        same = ", ".join(f"{name} {sum(values[i] for i in idx) / len(idx):.2f}" for name, values, _ in paper_rows)
        lines.append(f"The paper rows' Avg is over all {len(columns)}; over the same {len(present)} it is: {same}.")
    return lines


def render_tables(
    metrics: dict,
    label: str,
    compare_paper: Optional[str] = None,
    n_samples: int = 1,
    temperature: Optional[float] = None,
    top_p: Optional[float] = None,
) -> str:
    """table.md: the VLM table (the paper's Table 1 columns), the text table, other benchmarks, details."""
    lines = [f"# Evaluation: {label}", ""]
    sampling = f"{n_samples} sample(s) per prompt"
    if temperature is not None:
        sampling += f", temperature {temperature:g}, top-p {top_p:g}"
    acc_what = f"mean@{n_samples} (mean over samples and prompts)" if n_samples > 1 else "one sample per prompt"
    lines += [f"Accuracy in %: {acc_what}; {sampling}.", ""]

    paper_rows = []
    if compare_paper:
        key = compare_paper.lower()
        if key not in PAPER_TABLE1:
            raise ValueError(f"--compare-paper must be one of {', '.join(PAPER_TABLE1)}, got {compare_paper!r}")
        paper_rows = [(f"paper {key.upper()} {method}", values, avg) for method, values, avg in PAPER_TABLE1[key]]

    if paper_rows or any(b in metrics for b in VLM_BENCHMARKS):
        lines += _table("Multi-modal math (the paper's Table 1)", VLM_BENCHMARKS, metrics, label, paper_rows)
        lines += _avg_note(VLM_BENCHMARKS, metrics, label, paper_rows)
        if paper_rows:
            lines.append(
                f"paper rows: SAPO paper, Qwen2.5-VL-{compare_paper.upper()}-Instruct trained on Geo3K train only "
                "(published numbers, not re-run)."
            )
        lines.append("")
    if any(b in metrics for b in TEXT_BENCHMARKS):
        lines += _table("Text math", TEXT_BENCHMARKS, metrics, label)
        lines += _avg_note(TEXT_BENCHMARKS, metrics, label)
        lines.append("")
    others = [b for b in metrics if b not in VLM_BENCHMARKS + TEXT_BENCHMARKS]
    if others:
        lines += _table("Other benchmarks", others, metrics, label, with_avg=False)

    lines += ["## Details", ""]
    pass_col = [f"pass@{n_samples}"] if n_samples > 1 else []
    cols = ["Benchmark", "Prompts", "Samples/prompt", "Accuracy"] + pass_col + ["No \\boxed{} answer", "Truncated"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in metrics.items():
        cells = [name, str(m["count"]), str(m["n_samples"]), _pct(m["accuracy"])]
        if pass_col:
            cells.append(_pct(m.get(pass_col[0])))
        cells += [_pct(m["extraction_failure_rate"]), _pct(m.get("truncated_rate"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)
