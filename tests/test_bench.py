"""`make bench` keeps working (no timing is asserted: ratios are for people, not CI)."""

import json

import torch

from openrlhf_sapo import bench


def test_peak_memory_counts_allocations_not_inputs():
    x = torch.ones(256, 1024)
    assert bench.peak_extra_bytes(lambda: None, "cpu") == 0

    def two_temporaries():
        a = x * 2  # 1 MiB
        b = a + 1  # 1 MiB more while a lives
        return b.sum()

    peak = bench.peak_extra_bytes(two_temporaries, "cpu")
    assert 2 * x.numel() * 4 <= peak < 3 * x.numel() * 4


def test_bench_runs_small_and_reports_every_case(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--batch", "8", "--length", "64", "--repeats", "1", "--entropy_tokens", "16", "--vocab", "512",
                       "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["cases"]) == {"advantages", "policy_loss", "value_loss"}
    for name, case in results["cases"].items():
        assert case["sapo_ms"] > 0 and case["upstream_ms"] > 0
        assert case["sapo_peak_memory_x_BT"] > 0
        # the table people read shows the measured figures, ratio included
        assert (f"| {name} | {case['sapo_ms']:.2f} | {case['upstream_ms']:.2f} | {case['ratio']:.2f} |"
                in printed)
    entropy = results["entropy_pass"]
    assert entropy["tokens"] == 16 and entropy["vocab"] == 512 and entropy["entropy_ms"] > 0
    assert f"{entropy['entropy_ms']:.1f} ms vs the log-prob pass's {entropy['log_probs_ms']:.1f} ms" in printed


def test_median_seconds_times_the_function_it_is_given():
    """The timer behind every ratio: a 20 ms sleep measures as ~20 ms (warm-up calls not counted)."""
    import time

    calls = []

    def sleep_20ms():
        calls.append(1)
        time.sleep(0.02)

    seconds = bench.median_seconds(sleep_20ms, "cpu", repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.019 <= seconds < 0.2, seconds


def test_gpu_check_script_runs_with_torch_alone_and_reports_mismatches(monkeypatch, capsys):
    """tools/gpu_check.py (for a GPU machine with only torch): on CPU it runs clean; a device result
    that differs from CPU's, or a run that is not repeatable, is reported and fails the exit status."""
    import subprocess
    import sys

    from tools import gpu_check

    out = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['gpu_check', '--device', 'cpu', "
                          "'--seeds', '4', '--batch', '8', '--length', '64', '--repeats', '2']; "
                          "sys.modules['deepspeed'] = sys.modules['openrlhf'] = None; "  # must not be needed
                          "runpy.run_path('tools/gpu_check.py', run_name='__main__')"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all equal" in out.stdout and "bitwise repeatable" in out.stdout and "| segment_gae |" in out.stdout

    real, calls = gpu_check.algo_outputs, []

    def drifting(batch):  # every second call plays the device
        result = real(batch)
        calls.append(1)
        if len(calls) % 2 == 0:
            result["advantages"] = result["advantages"] + 1e-3
        return result

    monkeypatch.setattr(gpu_check, "algo_outputs", drifting)
    problems = gpu_check.compare("cpu", 2)
    assert len(problems) == 2 and all("advantages: max difference 0.001" in p for p in problems)
    assert gpu_check.determinism("cpu")  # the drifting op is not repeatable either
