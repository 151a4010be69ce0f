"""`make study` (openrlhf_sapo.demo.study): every arm is the demo's recipe plus its own flags, parsed as the
trainer parses them; the report's statistics (intervals, paired differences, verdicts, Lift per stage)."""

import json
import math
import os

import numpy as np
import pytest

from openrlhf_sapo.demo import study, study_diagnosis, study_report, study_stats
from openrlhf_sapo.demo.run import PRESETS


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """Every arm's training command, parsed by the single-process trainer's own parser (no preflight)."""
    from openrlhf_sapo.cli import train_local

    tmp = tmp_path_factory.mktemp("study")
    (tmp / "data").mkdir()
    prepared = {"model": str(tmp / "model"), "data_dir": str(tmp / "data"), "is_vlm": False}
    out = {}
    for arm in study.ARMS:
        cmd = study.arm_command(arm, 3, PRESETS["quick"], prepared, str(tmp / arm))
        parser = train_local.build_parser()
        out[arm] = parser.parse_args(cmd[3:])
    return out


def test_each_arm_is_its_recipe_with_its_own_flags(parsed):
    get = lambda arm, dest: getattr(parsed[arm], dest)  # noqa: E731  (flat argparse dests keep their dots)
    assert get("sapo", "algo.advantage.estimator") == "sapo" and get("sapo", "algo.sapo.topk_percent") == 30.0
    assert [get(f"sapo_top{k}", "algo.sapo.topk_percent") for k in (10, 20, 40, 50)] == [10.0, 20.0, 40.0, 50.0]
    assert get("sapo_naive_is", "algo.sapo.ratio") == "token"
    assert {get(a, "algo.sapo.segmenter") for a in ("sapo_newline", "sapo_step", "sapo_lowprob", "sapo_fixed")} == {
        "newline", "step", "lowprob", "fixed"}
    assert get("sapo_value_start", "algo.sapo.value_at") == "start"
    assert get("vcppo", "algo.advantage.estimator") == "gae" and get("vcppo", "algo.advantage.critic_lambd") == 1.0
    assert get("ppo", "algo.advantage.critic_lambd") is None
    assert get("soft_adaptive", "actor.policy_loss_type") == "soft_adaptive"
    assert get("soft_adaptive", "algo.advantage.estimator") == get("grpo", "algo.advantage.estimator") == "group_norm"
    # the diagnosis arms: critic-only steps first, then the recipe's actor steps; or twice the steps
    quick = PRESETS["quick"].steps
    for method in ("sapo", "ppo"):
        warm = f"{method}_critic_warmup"
        # one evaluation interval (2 steps) of critic-only steps, so the last step is evaluated
        assert get(warm, "critic.freezing_steps") == 2 and get(method, "critic.freezing_steps") == -1
        assert get(warm, "data.max_samples") == get(method, "data.max_samples") * (quick + 2) // quick
        assert get(warm, "algo.advantage.estimator") == get(method, "algo.advantage.estimator")
    for method in ("sapo", "ppo", "grpo"):
        assert get(f"{method}_long", "data.max_samples") == 2 * get(method, "data.max_samples")
    assert study.arm_steps(study.ARMS["sapo_critic_warmup"], PRESETS["full"]) == (30, 5)
    assert study.arm_steps(study.ARMS["grpo_long"], PRESETS["full"]) == (50, 0)
    # paired: the same seed and data for every arm
    assert {get(a, "train.seed") for a in study.ARMS} == {3}
    assert len({get(a, "data.prompt_dataset") for a in study.ARMS}) == 1


def test_only_selects_groups_and_arms():
    assert study.selected_arms(None, every_arm=True) == list(study.ARMS)
    paper = study.selected_arms(None)
    assert "sapo_top10" in paper and "sapo_value_start" in paper and not any("long" in a or "warmup" in a for a in paper)
    assert study.selected_arms(["ratio"]) == ["sapo", "sapo_naive_is"]
    assert study.selected_arms(["ppo", "value_at"]) == ["ppo", "sapo", "sapo_value_start"]
    # on digits the headline arms get the seeds a 2-point resolution needs; elsewhere 5
    assert study.default_seeds("digits", "sapo") == study.default_seeds("digits", "grpo") == tuple(range(1, 31))
    assert study.default_seeds("digits", "sapo_top10") == study.default_seeds("arithmetic", "sapo") == study.DEFAULT_SEEDS
    with pytest.raises(SystemExit, match="not a group"):
        study.selected_arms(["nope"])


def test_intervals_and_verdicts():
    m, lo, hi = study_stats.mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
    assert all(math.isnan(v) for v in study_stats.mean_ci([5.0])[1:])
    assert study_stats.verdict(0.5, 2.0, 5, "c").startswith("holds")
    assert study_stats.verdict(-2.0, -0.1, 5, "c").startswith("does not hold")
    assert study_stats.verdict(-1.0, 1.0, 5, "c").startswith("cannot tell")
    assert study_stats.verdict(math.nan, math.nan, 1, "c").startswith("cannot tell")
    n = study_stats.seeds_needed(3.0)  # paired sd 3 points -> enough seeds for +-2
    assert study_stats.t_critical(n - 1) * 3.0 / math.sqrt(n) <= 2.0 < study_stats.t_critical(n - 2) * 3.0 / math.sqrt(n - 1)


def test_lift_by_stage_and_trend():
    rows = [{"kind": "train", "step": s, "critic/value_jump_lift_q50": 1.0 + 0.01 * s,
             "critic/value_jump_lift_q90": 1.5 + 0.02 * s} for s in range(1, 10)]
    by_stage = study_report.lift_by_stage({1: rows, 2: rows})
    assert set(by_stage) == {"early", "middle", "late"}
    assert by_stage["late"][0.9][0] > by_stage["early"][0.9][0] > by_stage["early"][0.5][0]
    rho, (slope, lo, hi) = study_report.lift_trend({1: rows})
    assert rho == pytest.approx(1.0) and slope > 0 and lo > 0


def test_report_from_synthetic_runs(tmp_path):
    """The report writes every section from a study.json and its runs' metrics (no training)."""
    runs = {}
    rng = np.random.default_rng(0)
    for arm in study.ARMS:
        for seed in (1, 2, 3):
            run_dir = tmp_path / "digits" / "runs" / f"{arm}_seed{seed}"
            run_dir.mkdir(parents=True)
            acc = 0.5 + (0.05 if arm == "sapo" else 0.0) + 0.01 * rng.standard_normal()
            rows = [{"kind": "eval", "step": 0, "eval_digits_pass1": 0.4},
                    *({"kind": "train", "step": s, "critic_loss": 1 / s, "critic/explained_variance": 0.1 * s,
                       "policy_entropy": 1.0, "rollout/response_length_mean": 20.0,
                       "critic/value_jump_lift_q50": 1.1, "critic/value_jump_lift_q90": 1.4} for s in range(1, 7)),
                    {"kind": "eval", "step": 6, "eval_digits_pass1": acc}]
            (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
            runs[f"digits/{arm}_seed{seed}"] = {"task": "digits", "arm": arm, "seed": seed, "run_dir": str(run_dir),
                                                "seconds": 30.0, "returncode": 0}
    (tmp_path / "study.json").write_text(json.dumps({
        "config": {"seeds": [1, 2, 3], "steps": 6, "samples_per_step": 16}, "tasks": ["digits"],
        "arms": list(study.ARMS), "labels": {a: study.ARMS[a].label for a in study.ARMS}, "runs": runs,
        "finished": True, "seconds": 1000}))
    text = open(study_report.write_report(str(tmp_path))).read()
    for needle in ("Table 1", "Fig. 3", "Fig. 5", "Fig. 6", "Fig. 7", "Table 2", "Table 3", "value read at its start",
                   "52.75", "47.92", "41.6", "SAPO vs PPO: holds here", "Why SAPO wins or loses",
                   "the accuracy gap over training", "Segment placement (digits)",
                   "interventions (critic warm-up, twice the budget)", "twice the steps help SAPO"):
        assert needle in text, needle
    csv = (tmp_path / "final_accuracy.csv").read_text().splitlines()
    assert csv[0] == "task,arm,seed,accuracy_percent" and len(csv) == 1 + 3 * len(study.ARMS)
    plots = os.listdir(tmp_path / "plots")
    assert {"digits_fig3_lift_sapo.png", "digits_fig5_topk.png", "digits_fig6.png", "digits_fig7.png",
            "digits_accuracy_over_training.png"} <= set(plots)


def test_gap_over_training_is_paired_per_step():
    """SAPO - other at each evaluation step, over the seeds both have, with a t interval."""
    def rows(accs):
        return [{"kind": "eval", "step": step, "eval_x_pass1": a} for step, a in accs.items()]

    arm_runs = {"sapo": {1: rows({0: 0.4, 5: 0.6}), 2: rows({0: 0.4, 5: 0.7}), 3: rows({0: 0.4, 5: 0.5})},
                "grpo": {1: rows({0: 0.4, 5: 0.5}), 2: rows({0: 0.4, 5: 0.5}), 3: rows({0: 0.4, 5: 0.5})}}
    gaps = study_diagnosis.gap_over_training(arm_runs, "grpo")
    assert [g[0] for g in gaps] == [0, 5]
    assert gaps[0][1:4] == (0.0, 0.0, 0.0) and gaps[0][4] == 3
    step, mean, lo, hi, n = gaps[1]
    assert mean == pytest.approx(10.0) and lo < 10.0 < hi and n == 3
    assert study_diagnosis.gap_over_training({"sapo": arm_runs["sapo"]}, "grpo") == []


def test_late_explained_variance_clips_degenerate_batches():
    """A batch whose returns do not vary logs EV -1e14; one such step must not swamp the late mean."""
    ev = study_diagnosis.EXPLAINED_VARIANCE
    rows = [{"kind": "train", "step": s, ev: 0.5} for s in range(1, 10)] + [{"kind": "train", "step": 10, ev: -1e14}]
    late = study_diagnosis.late_explained_variance({1: rows})
    assert late[1] == pytest.approx((0.5 * 3 - 1.0) / 4)


def test_a_second_invocation_keeps_the_first_ones_runs(tmp_path):
    """`--only topk` after `--only headline` in the same folder reports both; failed or deleted runs and runs
    of another preset are not carried over."""
    def run(name, returncode=0, metrics=True):
        run_dir = tmp_path / name
        run_dir.mkdir()
        if metrics:
            (run_dir / "metrics.jsonl").write_text("{}")
        task, arm_seed = name.split("__")
        arm, seed = arm_seed.rsplit("_seed", 1)
        return {"task": task, "arm": arm, "seed": int(seed), "run_dir": str(run_dir), "returncode": returncode}

    config = {"seeds": [1, 2], "steps": 25}
    before = {"config": config, "arms": ["sapo", "sapo_newline"], "tasks": ["digits"],
              "labels": {"sapo": "SAPO", "sapo_newline": "newline"}, "arm_flags": {"sapo_newline": ["x"]},
              "runs": {"digits/sapo_seed1": run("digits__sapo_seed1"),
                       "digits/sapo_newline_seed1": run("digits__sapo_newline_seed1"),
                       "digits/sapo_newline_seed2": run("digits__sapo_newline_seed2", returncode=1),
                       "digits/sapo_fixed_seed1": run("digits__sapo_fixed_seed1", metrics=False)}}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(before))
    now = {"config": dict(config, seeds=[3]), "arms": ["ppo", "sapo"], "tasks": ["arithmetic"],
           "labels": {"ppo": "PPO", "sapo": "SAPO"}, "arm_flags": {"ppo": [], "sapo": []}}
    kept = study.earlier_runs(str(path), now)
    assert sorted(kept) == ["digits/sapo_newline_seed1", "digits/sapo_seed1"]
    assert now["arms"] == ["ppo", "sapo", "sapo_newline"]  # in ARMS order
    assert now["tasks"] == ["arithmetic", "digits"] and now["labels"]["sapo_newline"] == "newline"
    assert study.earlier_runs(str(path), dict(now, config={"seeds": [3], "steps": 10})) == {}
    assert study.earlier_runs(str(tmp_path / "none.json"), now) == {}
