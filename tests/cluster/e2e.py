"""`make e2e`: the shipped scripts on a 2-node CPU Ray cluster, end to end, with a report.

One cluster (tests/cluster/harness.py: two network namespaces, 1 declared GPU per node) runs:

  text-sapo-job   text/sapo.sh through multinode/submit_sapo.sh (`ray job submit`), tiny Qwen2 via
                  vLLM on CPU, 2 engines, actor / critic / reference with 2 ranks each
                  (one per node), colocated (--train.colocate_all, the scripts' default)
  text-sapo-pp2   text/sapo.sh with VLLM_PP=2: one vLLM engine of 2 pipeline stages under vLLM's Ray
                  executor, one stage per node
  text-sapo-async text/sapo.sh with --train.async_enable (1 actor rank, the engine on the other node)
  geo3k-sapo      geo3k/sapo.sh, tiny Qwen2.5-VL, VLM critic, HF rollout engines; killed with kill -9
                  after its step-2 checkpoint, then resumed with --ckpt.load_enable to step 4
  geo3k-ppo       geo3k/ppo.sh, same model, batch and seed as geo3k-sapo, no entropy pass (upstream's cost)
  geo3k-ppo-entropy  the same with --logger.policy_entropy: its first step equals geo3k-sapo's (seeding)
  geo3k-grpo      geo3k/grpo.sh

The scripts are scaled down only through their documented variables (MODEL_PATH, TRAIN_DATA,
NNODES, GPUS_PER_NODE, VLLM_PP, SAVE_STEPS, ...) and extra flags (batch sizes, lengths, steps,
--vllm.check_weight_sync; the reference model is dropped with --algo.kl.init_coef 0 except in the
first run; every run trains with the scripts' ZeRO-3). Each run is checked as a user would check it (see `check_run`); the report
(runs/e2e/report.md, with results.json) has per run the mode, steps, seconds per step and the
checks, plus SAPO vs PPO seconds per step (geo3k-sapo / geo3k-ppo, the same model, batch and seed)
and the same-seed first-step comparison. Exit status 1 if any check failed; 77 (skipped) with the
reason if no cluster can be made here.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from tests.cluster.harness import REPO, Cluster, ClusterUnavailable, check_can_create

NODES = {"10.77.0.1", "10.77.0.2"}
REWARD = os.path.join(REPO, "openrlhf_sapo", "demo", "reward_func.py")
SKIPPED = 77
# What step 1 depends on only through the prompts drawn and the responses sampled (not the update rule).
FIRST_STEP_TAGS = ("train/reward", "train/response_length", "train/policy_entropy")


@dataclass
class Run:
    name: str
    script: str
    mode: str
    env: Dict[str, str] = field(default_factory=dict)
    flags: List[str] = field(default_factory=list)
    steps: int = 2
    critic: bool = True
    sapo: bool = False
    ranks_on_both_nodes: bool = True
    engine_workers_on_both_nodes: bool = False
    submit: bool = False
    policy_entropy: bool = True  # logged: SAPO's entropy segmenter, or --logger.policy_entropy


def scaled_flags(steps: int, prompts_per_step: int = 8, max_len: int = 64) -> List[str]:
    return ["--data.max_samples", str(steps * prompts_per_step), "--rollout.batch_size", str(prompts_per_step),
            "--train.batch_size", str(prompts_per_step), "--train.num_episodes", "1",
            "--rollout.max_new_tokens", "16", "--data.max_len", str(max_len), "--vllm.check_weight_sync"]


NO_REF = ["--algo.kl.init_coef", "0"]


def runs() -> List[Run]:
    text = dict(NNODES="2", GPUS_PER_NODE="1")
    vlm = dict(NNODES="2", GPUS_PER_NODE="1")
    return [
        Run("text-sapo-job", "text/sapo.sh", "ray job submit, vLLM x2, ZeRO-3 2 ranks, colocated, with reference",
            env=text, flags=scaled_flags(2), sapo=True, submit=True),
        Run("text-sapo-pp2", "text/sapo.sh", "vLLM pipeline parallel 2 (Ray executor, a stage per node), colocated",
            env=dict(text, VLLM_PP="2"), flags=scaled_flags(2) + NO_REF, sapo=True, engine_workers_on_both_nodes=True),
        Run("text-sapo-async", "text/sapo.sh", "async (--train.async_enable), 1 actor rank",
            env=dict(NNODES="1", GPUS_PER_NODE="1"), flags=scaled_flags(2) + NO_REF + ["--train.async_enable"],
            sapo=True, ranks_on_both_nodes=False),
        Run("geo3k-sapo", "geo3k/sapo.sh", "VLM + VLM critic, HF engines, ZeRO-3, kill -9 after step 2, resumed",
            env=vlm, flags=scaled_flags(4, max_len=128) + NO_REF, steps=4, sapo=True),
        # PPO without --logger.policy_entropy: its experience forward costs what upstream's does (the benchmark)
        Run("geo3k-ppo", "geo3k/ppo.sh", "VLM + VLM critic, HF engines, ZeRO-3, no entropy pass", env=vlm,
            flags=scaled_flags(4, max_len=128) + NO_REF, steps=4, policy_entropy=False),
        # The same-seed check: PPO with --logger.policy_entropy draws geo3k-sapo's prompts and samples
        Run("geo3k-ppo-entropy", "geo3k/ppo.sh", "VLM + VLM critic, --logger.policy_entropy (same seed as geo3k-sapo)",
            env=vlm, flags=scaled_flags(4, max_len=128) + NO_REF + ["--logger.policy_entropy"], steps=4),
        Run("geo3k-grpo", "geo3k/grpo.sh", "VLM, group baseline (no critic), HF engines, ZeRO-3", env=vlm,
            flags=scaled_flags(2, max_len=128) + NO_REF + ["--logger.policy_entropy"], critic=False),
    ]


# ---------------------------------------------------------------- assets


def prepare_assets(root: str) -> Dict[str, str]:
    """Tiny models and data from openrlhf_sapo.demo (built once per workdir)."""
    from openrlhf_sapo.demo.data import write_split
    from openrlhf_sapo.demo.tasks import get_task
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2, build_tiny_qwen2_5_vl

    paths = {"text_model": os.path.join(root, "text-model"), "vlm": os.path.join(root, "vlm"),
             "text_data": os.path.join(root, "text-data"), "vlm_data": os.path.join(root, "vlm-data")}
    if not os.path.exists(os.path.join(root, "done")):
        build_tiny_qwen2(paths["text_model"], hidden=128, layers=2, heads=4)  # vLLM's CPU attention: head_dim 32
        build_tiny_qwen2_5_vl(paths["vlm"])
        for split in ("train", "heldout"):
            write_split(get_task("arithmetic"), paths["text_data"], split, 64)
            write_split(get_task("digits"), paths["vlm_data"], split, 64)
        open(os.path.join(root, "done"), "w").close()
    return paths


def run_env(run: Run, assets: Dict[str, str], workdir: str) -> Dict[str, str]:
    vlm = run.script.startswith("geo3k/")
    env = {
        "MODEL_PATH": assets["vlm" if vlm else "text_model"],
        "TRAIN_DATA": os.path.join(assets["vlm_data" if vlm else "text_data"], "train.jsonl"),
        "EVAL_DATA": os.path.join(assets["vlm_data" if vlm else "text_data"], "heldout.jsonl"),
        "REWARD_FUNC": REWARD, "SAVE_ROOT": os.path.join(workdir, "ckpt"), "LOG_ROOT": os.path.join(workdir, "tb"),
        "RUN_NAME": run.name, "EVAL_STEPS": "-1", "SAVE_STEPS": "2" if run.name == "geo3k-sapo" else "-1",
        "MICRO_TRAIN_BATCH": "4", "MICRO_ROLLOUT_BATCH": "4", "PYTHON": sys.executable, "SEED": "42",
    }
    env.update(run.env)
    return env


# ---------------------------------------------------------------- reading a run


def scalars(tb_dir: str) -> Dict[str, Dict[int, float]]:
    """tag -> {step: value} over every event file of a run (a resumed run adds a file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: Dict[str, Dict[int, float]] = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "*", "events.out.tfevents.*"))):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def log_lines(path: str, marker: str) -> List[str]:
    with open(path, errors="replace") as f:
        return [line for line in f if marker in line]


def engine_worker_nodes(log: str) -> set:
    """The nodes of the vLLM workers that took part in the weight syncs (SAPO's check prints them)."""
    nodes = set()
    for line in log_lines(log, "weight sync check:"):
        if "engine workers on nodes " in line:
            nodes.update(line.split("engine workers on nodes ", 1)[1].split())
    return nodes


def sync_checks(log: str) -> List[Dict[str, float]]:
    found = []
    for line in log_lines(log, "weight sync check:"):
        words = line.replace("(", " ").replace(")", " ").replace(",", " ").split()
        values = {key: float(words[words.index(key) + 1]) for key in ("count", "sum", "sum_sq")}
        found.append(values)
    return found


def actor_nodes(log: str) -> set:
    return {line.rsplit("on node", 1)[1].strip() for line in log_lines(log, "[openrlhf_sapo] actor rank")}


def safetensors_checksum(folder: str) -> Dict[str, float]:
    from safetensors.torch import load_file

    from openrlhf_sapo.trainer.ray.vllm_worker_wrap import parameters_checksum

    tensors = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        tensors.update(load_file(path))
    return parameters_checksum(tensors.items())


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


def check_run(run: Run, rc: int, log: str, tb: Dict[str, Dict[int, float]], first_step: int = 1) -> Dict[str, bool]:
    steps = sorted(tb.get("train/reward", {}))
    checks = {
        "finished (exit 0)": rc == 0,
        f"steps {first_step}..{run.steps} logged": steps == list(range(first_step, run.steps + 1)),
        "rewards logged": bool(tb.get("train/reward")),
        ("policy_entropy logged" if run.policy_entropy else "no entropy pass (policy_entropy not logged)"):
            bool(tb.get("train/policy_entropy")) == run.policy_entropy,
        "weight sync checked after every step": len(sync_checks(log)) >= run.steps - first_step + 1,
    }
    if run.critic:
        checks["critic metrics logged"] = bool(tb.get("train/critic_loss")) and bool(tb.get("train/values"))
    if run.sapo:
        checks["sapo/* metrics logged"] = any(tag.startswith("train/sapo/") for tag in tb)
    if run.ranks_on_both_nodes:
        checks["actor ranks on both nodes"] = actor_nodes(log) == NODES
    if run.engine_workers_on_both_nodes:
        checks["engine workers on both nodes"] = engine_worker_nodes(log) == NODES
    return checks


def seconds_per_step(tb: Dict[str, Dict[int, float]], warmup_steps=(1,)) -> Optional[float]:
    """Median `train/timing/step_total` over the steps after each process's first (warm-up) step."""
    totals = [v for step, v in tb.get("train/timing/step_total", {}).items() if step not in warmup_steps]
    return statistics.median(totals) if totals else None


# ---------------------------------------------------------------- running


def command(run: Run) -> List[str]:
    if run.submit:
        return ["bash", os.path.join(REPO, "examples", "scripts", "multinode", "submit_sapo.sh")]
    return ["bash", os.path.join(REPO, "examples", "scripts", run.script)]


def launch(cluster: Cluster, run: Run, env: Dict[str, str], flags: List[str], log: str) -> subprocess.Popen:
    if run.submit:
        env = dict(env, RAY_ADDRESS=cluster.dashboard_address, SCRIPT=run.script)
    return cluster.popen([*command(run), *flags], log=log, env=env)


def wait_for_checkpoint(folder: str, step: int, proc: subprocess.Popen, timeout: float) -> bool:
    """True once the actor's and the critic's step checkpoints and the HF copy are complete."""
    deadline = time.time() + timeout
    done = [os.path.join(folder, f"global_step{step}_hf", "config.json")]
    latest = [os.path.join(folder, role, "latest") for role in ("_actor", "_critic")]
    while time.time() < deadline and proc.poll() is None:
        ok = all(os.path.exists(p) for p in done) and all(
            os.path.exists(p) and open(p).read().strip() == f"global_step{step}" for p in latest)
        if ok:
            return True
        time.sleep(1)
    return False


def driver_pid(proc: subprocess.Popen) -> Optional[int]:
    """The training driver (python -m openrlhf_sapo.cli.train_ppo_ray) under the script's shell."""
    out = subprocess.run(["pgrep", "-g", str(proc.pid), "-f", "openrlhf_sapo.cli.train_ppo_ray"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def execute(cluster: Cluster, run: Run, assets, workdir: str, timeout: float) -> Dict:
    env = run_env(run, assets, workdir)
    for sub in ("tb", "ckpt"):
        subprocess.run(["rm", "-rf", os.path.join(workdir, sub, run.name)], check=True)
    log = os.path.join(workdir, "logs", f"{run.name}.log")
    tb_dir = os.path.join(workdir, "tb", run.name)
    started = time.time()
    result = {"name": run.name, "script": run.script, "mode": run.mode, "log": os.path.relpath(log, REPO)}
    if run.name != "geo3k-sapo":
        try:
            rc = cluster.run([*command(run), *run.flags], log=log, timeout=timeout,
                             env=dict(env, RAY_ADDRESS=cluster.dashboard_address, SCRIPT=run.script)
                             if run.submit else env)
        except TimeoutError as err:
            rc, result["error"] = -1, str(err)
        tb = scalars(tb_dir)
        result["checks"] = check_run(run, rc, log, tb)
    else:
        result.update(kill_and_resume(cluster, run, env, log, tb_dir, timeout))
        tb = scalars(tb_dir)
    result["seconds"] = round(time.time() - started, 1)
    result["steps"] = len(tb.get("train/reward", {}))
    result["seconds_per_step"] = seconds_per_step(tb, (1, 3) if run.name == "geo3k-sapo" else (1,))
    result["first_step"] = {tag: tb.get(tag, {}).get(1) for tag in FIRST_STEP_TAGS}
    return result


def kill_and_resume(cluster: Cluster, run: Run, env, log: str, tb_dir: str, timeout: float) -> Dict:
    ckpt = os.path.join(env["SAVE_ROOT"], run.name, "ckpt")
    proc = cluster.popen([*command(run), *run.flags], log=log, env=env)
    saved = wait_for_checkpoint(ckpt, 2, proc, timeout)
    pid = driver_pid(proc) if saved else None
    if pid:
        os.kill(pid, signal.SIGKILL)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    killed_at = max(scalars(tb_dir).get("train/reward", {0: 0}))
    time.sleep(5)  # Ray ends the dead driver's job and its actors
    resume_log = log.replace(".log", "-resumed.log")
    try:
        rc = cluster.run([*command(run), *run.flags, "--ckpt.load_enable"], log=resume_log, timeout=timeout, env=env)
    except TimeoutError:
        rc = -1
    tb = scalars(tb_dir)
    saved_sum = safetensors_checksum(os.path.join(ckpt, "global_step2_hf")) if saved else None
    syncs = sync_checks(resume_log)
    resumed = syncs[0] if syncs else None  # upstream syncs the loaded weights into the engines first
    checks = {"killed with kill -9 after the step-2 checkpoint": bool(saved and pid)}
    checks.update(check_run(run, rc, resume_log, {k: {s: v for s, v in d.items() if s > 2} for k, d in tb.items()},
                            first_step=3))
    checks["resumed from step 2 (first resumed step is 3)"] = bool(log_lines(resume_log, "global_step")) and min(
        (s for s in tb.get("train/reward", {}) if s > 2), default=0) == 3
    checks["resumed with the saved weights (checksum)"] = bool(saved_sum and resumed) and all(
        close(saved_sum[k], resumed[k]) for k in ("count", "sum", "sum_sq"))
    checks["killed run: actor ranks on both nodes"] = actor_nodes(log) == NODES
    return {"checks": checks, "killed_after_step": killed_at, "saved_checksum": saved_sum,
            "resumed_checksum": resumed, "resume_log": os.path.relpath(resume_log, REPO)}


# ---------------------------------------------------------------- report


def write_report(results: List[Dict], workdir: str, cluster_seconds: float, total_seconds: float) -> str:
    by_name = {r["name"]: r for r in results}
    lines = ["# End-to-end runs on a 2-node CPU Ray cluster", "",
             f"Two network namespaces, 1 declared GPU each; cluster start {cluster_seconds:.0f} s; everything "
             f"{total_seconds / 60:.1f} min. Logs and tensorboard under `{os.path.relpath(workdir, REPO)}`.", "",
             "| run | script | mode | steps | s/step | run s | checks |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ok = sum(r["checks"].values())
        sps = f"{r['seconds_per_step']:.2f}" if r.get("seconds_per_step") else "-"
        lines.append(f"| {r['name']} | {r['script']} | {r['mode']} | {r['steps']} | {sps} | {r['seconds']:.0f} | "
                     f"{ok}/{len(r['checks'])} |")
    lines += ["", "## Checks", ""]
    for r in results:
        lines.append(f"- **{r['name']}**: " + "; ".join(f"{'PASS' if v else 'FAIL'} {k}" for k, v in r["checks"].items()))
    sapo, ppo, seeded = by_name.get("geo3k-sapo"), by_name.get("geo3k-ppo"), by_name.get("geo3k-ppo-entropy")
    if sapo and ppo:
        lines += ["", "## SAPO vs PPO (benchmark, not a test)", ""]
        if sapo.get("seconds_per_step") and ppo.get("seconds_per_step"):
            ratio = sapo["seconds_per_step"] / ppo["seconds_per_step"]
            lines.append(f"geo3k tiny VLM, same model, batch and seed, median `train/timing/step_total` without each "
                         f"process's warm-up step (steps 1 and, after the resume, 3): SAPO "
                         f"{sapo['seconds_per_step']:.2f} s, PPO {ppo['seconds_per_step']:.2f} s, ratio **{ratio:.3f}** "
                         f"(target <= 1.03). PPO without --logger.policy_entropy, so its experience forward is "
                         f"upstream's; SAPO's includes the entropy pass it needs. Two cores shared by every process: "
                         f"expect +-10% noise.")
    if sapo and seeded:
        lines += ["", "## Same seed, same first step", "",
                  f"Step 1 of geo3k-sapo and geo3k-ppo-entropy (seed 42, same prompts and engine seed; the update rule "
                  f"only acts after step 1): " + ", ".join(f"{tag[6:]} {sapo['first_step'][tag]} vs "
                                                           f"{seeded['first_step'][tag]}" for tag in FIRST_STEP_TAGS) + "."]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="The shipped scripts end to end on a 2-node CPU Ray cluster.")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "e2e"))
    parser.add_argument("--only", nargs="*", help="run only these runs (names from the module docstring)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    args = parser.parse_args(argv)
    try:
        check_can_create()
    except ClusterUnavailable as err:
        print(f"e2e skipped: {err}", file=sys.stderr)
        return SKIPPED
    start = time.time()
    workdir = os.path.abspath(args.workdir)
    for sub in ("logs", "tb", "ckpt"):
        subprocess.run(["rm", "-rf", os.path.join(workdir, sub)], check=True)
        os.makedirs(os.path.join(workdir, sub))
    assets = prepare_assets(os.path.join(workdir, "assets"))
    selected = [r for r in runs() if not args.only or r.name in args.only]
    results = []
    with Cluster(os.path.join(workdir, "cluster"), gpus_per_node=1, cpus_per_node=8) as cluster:
        cluster_seconds = time.time() - start
        for run in selected:
            print(f"[e2e] {run.name}: {run.mode} ...", flush=True)
            result = execute(cluster, run, assets, workdir, args.timeout)
            failed = [k for k, v in result["checks"].items() if not v]
            print(f"[e2e] {run.name}: {result['seconds']:.0f} s, {'FAILED ' + str(failed) if failed else 'ok'}",
                  flush=True)
            results.append(result)
    by_name = {r["name"]: r for r in results}
    if "geo3k-sapo" in by_name and "geo3k-ppo-entropy" in by_name:
        a, b = by_name["geo3k-sapo"]["first_step"], by_name["geo3k-ppo-entropy"]["first_step"]
        # reward and length exactly; the entropy to bf16 forward noise (micro-batches differ between runs)
        by_name["geo3k-ppo-entropy"]["checks"]["same first step as geo3k-sapo (seed 42: reward, length, entropy)"] = (
            a[FIRST_STEP_TAGS[0]] is not None and all(a[t] == b[t] for t in FIRST_STEP_TAGS[:2])
            and None not in (a[FIRST_STEP_TAGS[2]], b[FIRST_STEP_TAGS[2]])
            and abs(a[FIRST_STEP_TAGS[2]] - b[FIRST_STEP_TAGS[2]]) <= 1e-4 * abs(a[FIRST_STEP_TAGS[2]]))
    report = write_report(results, workdir, cluster_seconds, time.time() - start)
    print(open(report).read())
    return 0 if all(all(r["checks"].values()) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
