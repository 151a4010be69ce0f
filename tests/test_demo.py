"""`make demo` (python -m openrlhf_sapo.demo): the report from known metrics, and the whole quick
demo end to end (tiny VLM, warm start, PPO / GRPO / SAPO through train_local, report, plots)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openrlhf_sapo.demo import report as demo_report


def fake_run(out, method, seed, accuracies, step_seconds, critic=True):
    run_dir = os.path.join(out, "runs", f"{method}_seed{seed}")
    os.makedirs(run_dir)
    rows = []
    for step, acc in enumerate(accuracies):
        rows.append({"kind": "eval", "step": step * 2, "eval_digits_pass1": acc})
        if step:
            for s in (step * 2 - 1, step * 2):
                row = {"kind": "train", "step": s, "rollout/reward_mean": acc, "rollout/response_length_mean": 20.0,
                       "rollout/num_samples": 8.0, "policy_entropy": 0.5, "timing/step_total": step_seconds}
                if critic:
                    row["critic_loss"] = 0.1 / s
                if method == "sapo":
                    row.update({"sapo/segments_per_response": 6.0, "sapo/segment_length_mean": 3.0})
                rows.append(row)
    rows.sort(key=lambda r: (r["step"], r["kind"] == "eval"))
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    with open(os.path.join(run_dir, "command.sh"), "w") as f:
        f.write(f"#!/usr/bin/env bash\npython -m openrlhf_sapo.cli.train_local --train.seed {seed}\n")
    return {"method": method, "seed": seed, "run_dir": run_dir, "seconds": 10.0, "returncode": 0}


def test_report_tables_findings_and_plots(tmp_path):
    out = str(tmp_path)
    runs = {}
    curves = {"ppo": ([0.2, 0.25, 0.30], [0.2, 0.27, 0.32]), "grpo": ([0.2, 0.3, 0.4], [0.2, 0.32, 0.42]),
              "sapo": ([0.2, 0.4, 0.5], [0.2, 0.41, 0.52])}
    for method, per_seed in curves.items():
        for seed, acc in enumerate(per_seed, 1):
            runs[f"{method}_seed{seed}"] = fake_run(out, method, seed, acc, {"ppo": 2.0, "grpo": 1.5, "sapo": 2.1}[method],
                                                    critic=method != "grpo")
    summary = {"task": "digits", "preset": "full", "setup_seconds": 30, "total_seconds": 600, "runs": runs,
               "finished": True, "methods": ["ppo", "grpo", "sapo"],
               "method_flags": {"sapo": ["--algo.advantage.estimator", "sapo"]},
               "warm_start": {"eval_accuracy": 0.2, "eval_boxed_rate": 1.0},
               "config": {"steps": 4, "samples_per_step": 8, "grpo_group": 4, "updates_per_step": 2, "eval_n": 8,
                          "eval_every": 2, "warm_steps": 10, "seeds": [1, 2]}}
    with open(tmp_path / "summary.json", "w") as f:
        json.dump(summary, f)

    text = open(demo_report.write_report(out)).read()
    assert "| SAPO | 2 | 20.0 ± 0.0 | 51.0 ± 1.4 | 51.0 ± 1.4 |" in text
    assert "| PPO | 2 | 20.0 ± 0.0 | 31.0 ± 1.4 |" in text
    assert "Highest final held-out accuracy: SAPO (51.0%)." in text
    assert "SAPO ends 20.0 points above PPO (larger than twice the seed spread)." in text
    assert "SAPO ends 10.0 points above GRPO (larger than twice the seed spread)." in text
    assert "1.05x PPO's" in text  # 2.1 s vs 2.0 s per step
    for name in ("accuracy", "reward", "value_loss", "response_length", "entropy", "segments"):
        path = tmp_path / "plots" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"plots/{name}.png" in text
    assert text.count("/command.sh` |") == 6 and "| sapo_seed2 | 10 | `runs/sapo_seed2/command.sh` |" in text
    assert "- SAPO: `--algo.advantage.estimator sapo`" in text
    assert "unfinished" not in text

    # A gap inside the seed spread is reported as no clear difference, and a loss as a loss.
    table = demo_report.summarize(demo_report.load_runs(out))
    table["sapo"]["final"] = table["ppo"]["final"] - 0.005
    lines = demo_report.findings(table)
    assert any(line.startswith("SAPO ends 0.5 points below PPO (within twice the seed spread") for line in lines)


def _write_summary(out, runs, finished, seeds=(1,)):
    summary = {"task": "digits", "preset": "quick", "setup_seconds": 3, "total_seconds": 60, "runs": runs,
               "finished": finished, "methods": ["ppo", "grpo", "sapo"], "warm_start": {},
               "config": {"steps": 2, "samples_per_step": 8, "grpo_group": 4, "updates_per_step": 1, "eval_n": 8,
                          "eval_every": 2, "warm_steps": 10, "seeds": list(seeds)}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_report_of_an_unfinished_demo_and_of_nothing(tmp_path):
    out = str(tmp_path)
    with pytest.raises(SystemExit, match="summary.json is missing.*make demo"):
        demo_report.write_report(out)
    _write_summary(out, {}, finished=False)
    with pytest.raises(SystemExit, match="no finished run"):
        demo_report.write_report(out)
    # Interrupted after two of three runs: a report of those two, saying so.
    runs = {f"{m}_seed1": fake_run(out, m, 1, [0.0, 0.0], 1.0, critic=m != "grpo") for m in ("ppo", "grpo")}
    _write_summary(out, runs, finished=False)
    text = open(demo_report.write_report(out)).read()
    assert "**unfinished demo**: 2 of 3 runs done" in text
    assert "| PPO | 1 |" in text and "| GRPO | 1 |" in text and "| SAPO |" not in text
    # Every method at 0%: no "highest" method is named.
    assert "Every method ends at the same held-out accuracy (0.0%): no ranking." in text
    assert "Highest" not in text


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "openrlhf_sapo.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "report.md").read_text()
    for label in ("PPO", "GRPO", "SAPO"):
        assert f"| {label} | 1 |" in text
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["runs"]) == {"ppo_seed1", "grpo_seed1", "sapo_seed1"}
    for name, status in summary["runs"].items():
        run = out / "runs" / name
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
        assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2]
        assert (run / "command.sh").read_text().count("openrlhf_sapo.cli.train_local") == 1
        assert os.listdir(run / "tensorboard")
    assert (out / "plots" / "segments.png").exists()
    assert (out / "warm_start" / "config.json").exists()
    assert summary["finished"] and summary["numerics"]["OMP_NUM_THREADS"] == "2"

    # Rerun into the same folder: nothing is trained again. Then a run without its status (as if
    # the demo had been killed in it) is the only one redone.
    before = {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in summary["runs"]}
    os.remove(out / "runs" / "grpo_seed1" / "status.json")
    proc = subprocess.run([sys.executable, "-m", "openrlhf_sapo.demo", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ppo_seed1: finished in an earlier attempt" in proc.stderr
    assert "sapo_seed1: finished in an earlier attempt" in proc.stderr
    assert "grpo_seed1: finished" not in proc.stderr
    after = {n: (out / "runs" / n / "metrics.jsonl").stat().st_mtime_ns for n in summary["runs"]}
    assert after["ppo_seed1"] == before["ppo_seed1"] and after["sapo_seed1"] == before["sapo_seed1"]
    assert after["grpo_seed1"] != before["grpo_seed1"]
    # The report alone, from the runs on disk.
    os.remove(out / "report.md")
    proc = subprocess.run([sys.executable, "-m", "openrlhf_sapo.demo.report", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| SAPO | 1 |" in (out / "report.md").read_text()


def test_analysis_labels_each_token_and_locates_the_first_error():
    from openrlhf_sapo.demo.analysis import first_error, token_roles
    from openrlhf_sapo.demo.tasks import get_task

    text = "3,5,2\n3*5=15\n15+2=17\n\\boxed{17}"
    roles = token_roles(list(text) + ["<|im_end|>"])
    assert roles[:6] == ["reading digit", "reading comma", "reading digit", "reading comma", "reading digit", "newline"]
    assert roles[6:12] == ["operand", "operator", "operand", "equals", "result digit", "result digit"]
    assert roles[-5:] == ["boxed markup", "answer digit", "answer digit", "boxed markup", "end"]
    assert roles.count("boxed markup") == len("\\boxed{}")

    task = get_task("digits")
    example = next(e for e in task.sample(20, "heldout", 0) if len(e.meta["numbers"]) == 3 and e.meta["ops"] == ["+", "+"])
    a, b, c = example.meta["numbers"]
    assert first_error(example.solution, example) == "none"
    misread = example.solution.replace(f"{a},{b},{c}", f"{(a + 1) % 10},{b},{c}", 1)
    assert first_error(misread, example) == "misread"
    lines = example.solution.split("\n")
    slip = "\n".join([lines[0], f"{a}+{b}={a + b + 1}", *lines[2:]])
    assert first_error(slip, example) == "arithmetic"
    wrong_box = "\n".join([*lines[:-1], f"\\boxed{{{int(example.label) + 1}}}"])
    assert first_error(wrong_box, example) == "inconsistent"
    assert first_error("no answer", example) == "format"
