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
    assert bench.main(["--batch", "8", "--length", "64", "--repeats", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["cases"]) == {"advantages", "policy_loss", "value_loss"}
    for name, case in results["cases"].items():
        assert case["sapo_ms"] > 0 and case["upstream_ms"] > 0
        assert case["sapo_peak_memory_x_BT"] > 0
        # the table people read shows the measured figures, ratio included
        assert (f"| {name} | {case['sapo_ms']:.2f} | {case['upstream_ms']:.2f} | {case['ratio']:.2f} |"
                in printed)


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
