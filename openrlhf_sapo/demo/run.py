"""`python -m openrlhf_sapo.demo` (`make demo`): PPO, GRPO and SAPO from one warm-started tiny model.

1. builds the task's tiny model offline (a Qwen2.5-VL for `digits`, a Qwen2 for `arithmetic`),
   warm-starts it on step-wise solutions with realistic mistakes (cached under `<out>/warm_start`),
   and writes the prompt files (`<out>/data/{train,heldout}.jsonl`);
2. trains every method for every seed with `python -m openrlhf_sapo.cli.train_local` (run in this
   process; the exact command is saved next to its outputs), the same number of samples per step
   and of steps for every method (GRPO draws fewer prompts and several samples each);
3. writes `<out>/report.md` with plots (demo/report.py).

Every run logs to tensorboard (`<run>/tensorboard`) and to `<run>/metrics.jsonl`; a finished run
leaves `<run>/status.json`. Rerunning the demo into the same folder skips every run whose status
holds the same command (an interrupted demo resumes there; the run it was in starts over), and
`<out>/summary.json` is rewritten after each run, so the report can be written at any time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shlex
import shutil
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional

from openrlhf_sapo.demo.tasks import TASKS, get_task

REWARD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reward_func.py")


@dataclass(frozen=True)
class Preset:
    seeds: tuple = (1, 2, 3)
    steps: int = 25  # RL steps per run (30 took 13.4 min in all on a 2-core EPYC: too close to the 15-min goal)
    samples_per_step: int = 48  # responses generated per step, every method
    grpo_group: int = 4  # GRPO samples per prompt
    updates_per_step: int = 4  # optimizer steps per RL step (train batch = samples / updates)
    eval_every: int = 5
    eval_n: int = 128  # held-out problems (greedy); 64 left a +-6-point standard error
    max_new_tokens: int = 40
    # The tiny VLM learns to read the digits abruptly after ~600-800 steps of 32 (measured: 800
    # steps -> 78% of readings and 59% of answers right on held-out images; 600 steps -> 0-17%).
    warm_steps: int = 800
    warm_batch: int = 32
    model: Dict = field(default_factory=dict)  # tiny model size overrides


PRESETS = {
    "full": Preset(),
    "quick": Preset(seeds=(1,), steps=2, samples_per_step=16, updates_per_step=1, eval_every=2, eval_n=8,
                    max_new_tokens=24, warm_steps=20, warm_batch=8),
}

# Per method: the paper's recipe (SAPO_SPEC 6), scaled to a tiny model (larger learning rates).
ACTOR_LR, CRITIC_LR = 1e-4, 1e-3


def method_flags(method: str, model: str, preset: Preset) -> List[str]:
    critic = ["--critic.model_name_or_path", model, "--critic.adam.lr", str(CRITIC_LR),
              "--critic.lr_warmup_ratio", "0", "--critic.lr_scheduler", "constant"]
    kl_in_reward = ["--algo.kl.init_coef", "0.001", "--algo.kl.estimator", "k1"]
    table = {
        "ppo": ["--algo.advantage.estimator", "gae", "--algo.advantage.gamma", "1.0", "--algo.advantage.lambd", "0.95",
                *critic, *kl_in_reward],
        "sapo": ["--algo.advantage.estimator", "sapo", "--algo.advantage.gamma", "1.0", "--algo.advantage.lambd", "0.99",
                 "--algo.sapo.segmenter", "entropy", "--algo.sapo.topk_percent", "30", *critic, *kl_in_reward],
        "grpo": ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", str(preset.grpo_group),
                 "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", "0.01"],
    }
    return table[method]


METHODS = ("ppo", "grpo", "sapo")


def prompts_per_step(method: str, preset: Preset) -> int:
    return preset.samples_per_step // (preset.grpo_group if method == "grpo" else 1)


def train_command(method: str, seed: int, preset: Preset, model: str, data_dir: str, run_dir: str,
                  is_vlm: bool) -> List[str]:
    prompts = prompts_per_step(method, preset)
    train_batch = max(1, preset.samples_per_step // preset.updates_per_step)
    cmd = [
        sys.executable, "-m", "openrlhf_sapo.cli.train_local",
        "--actor.model_name_or_path", model,
        "--reward.remote_url", REWARD_FILE,
        "--data.prompt_dataset", os.path.join(data_dir, "train.jsonl"),
        "--data.input_key", "prompt", "--data.label_key", "label", "--data.apply_chat_template",
        "--data.max_samples", str(prompts * preset.steps),
        "--eval.dataset", os.path.join(data_dir, "heldout.jsonl"),
        "--eval.steps", str(preset.eval_every), "--eval.temperature", "0", "--eval.n_samples_per_prompt", "1",
        "--local.eval_at_start", "--ckpt.best_metric_key", "none",
        "--rollout.batch_size", str(prompts), "--rollout.micro_batch_size", str(preset.samples_per_step),
        "--rollout.max_new_tokens", str(preset.max_new_tokens), "--rollout.temperature", "1.0",
        "--data.max_len", str(preset.max_new_tokens + 96),
        "--train.batch_size", str(train_batch), "--train.micro_batch_size", str(train_batch),
        "--train.max_epochs", "1", "--train.num_episodes", "1", "--train.seed", str(seed),
        "--actor.adam.lr", str(ACTOR_LR), "--actor.lr_warmup_ratio", "0", "--actor.lr_scheduler", "constant",
        "--actor.eps_clip_low_high", "0.2", "0.28", "--actor.dual_clip", "3.0",  # every method, as recipe.sh
        "--logger.policy_entropy",  # the report plots every method's entropy (each pays the same pass)
        "--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--ds.attn_implementation", "sdpa",
        "--ckpt.path", os.path.join(run_dir, "ckpt"), "--ckpt.output_dir", os.path.join(run_dir, "model"),
        "--logger.tensorboard_dir", os.path.join(run_dir, "tensorboard"),
        "--local.metrics_jsonl", os.path.join(run_dir, "metrics.jsonl"),
        *method_flags(method, model, preset),
    ]
    if is_vlm:
        cmd += ["--data.image_key", "images"]
    return cmd


# --------------------------------------------------------------------------------------------------
# Set-up: tiny model, warm start, data


def prepare(task_name: str, preset: Preset, out: str, progress: bool = True, train_steps: int = 0) -> dict:
    """The task's tiny model, warm start (cached) and data: enough training prompts for `train_steps`
    (default the preset's steps) of the method with the most prompts per step. A longer run's file
    starts with a shorter run's prompts (the task's examples are one seeded sequence)."""
    from openrlhf_sapo.demo.data import write_split
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2, build_tiny_qwen2_5_vl
    from openrlhf_sapo.demo.warm_start import warm_start

    task = get_task(task_name)
    is_vlm = task_name == "digits"
    warm_dir = os.path.join(out, "warm_start")
    stamp = {"task": task_name, "warm_steps": preset.warm_steps, "warm_batch": preset.warm_batch, "model": preset.model}
    stamp_path = os.path.join(warm_dir, "demo_warm_start.json")
    if os.path.exists(stamp_path) and json.load(open(stamp_path)).get("config") == stamp:
        metrics = json.load(open(stamp_path))["metrics"]
    else:
        base = os.path.join(out, "base_model")
        build = build_tiny_qwen2_5_vl if is_vlm else build_tiny_qwen2
        build(base, **({"heads": 2} if not is_vlm else {}), **preset.model)
        metrics = warm_start(base, task, warm_dir, steps=preset.warm_steps, batch_size=preset.warm_batch,
                             progress=progress, eval_n=preset.eval_n)
        metrics = {k: v for k, v in metrics.items() if k not in ("losses", "eval_responses")}
        with open(stamp_path, "w") as f:
            json.dump({"config": stamp, "metrics": metrics}, f, indent=1)
    data_dir = os.path.join(out, "data")
    n_train = max(prompts_per_step(m, preset) for m in METHODS) * max(preset.steps, train_steps)
    write_split(task, data_dir, "train", max(n_train, 64), seed=0)
    write_split(task, data_dir, "heldout", preset.eval_n, seed=0)
    return {"model": warm_dir, "data_dir": data_dir, "is_vlm": is_vlm, "warm_start": metrics}


# --------------------------------------------------------------------------------------------------
# Runs


def _train_rows(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum('"kind": "train"' in line for line in f)


@contextlib.contextmanager
def _output_to(path: str):
    """Send this process's stdout and stderr (file descriptors 1 and 2: prints, logging, tqdm and
    C extensions alike) to `path` for the block."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


STATUS_FILE = "status.json"


def finished_status(cmd: List[str], run_dir: str) -> Optional[dict]:
    """The saved status of a run that finished with exactly this command, else None."""
    path = os.path.join(run_dir, STATUS_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return None
    if status.pop("args", None) != cmd[3:] or status.get("returncode") != 0:
        return None
    return status


def run_one(cmd: List[str], run_dir: str, bar=None, total_steps: int = 0) -> dict:
    """Run one training command (`python -m openrlhf_sapo.cli.train_local ...`) in this process,
    its output in <run_dir>/train.log; the command is saved as <run_dir>/command.sh. In-process
    saves the ~14 s of imports a fresh process pays per run; train() leaves nothing behind
    (process group, DeepSpeed groups and CPU patches are undone). A run that finished before with
    the same command is not run again. Returns its status (also saved as <run_dir>/status.json)."""
    from openrlhf_sapo.cli import train_local

    done = finished_status(cmd, run_dir)
    if done is not None:
        if bar is not None:
            bar.update(total_steps)
        return dict(done, skipped=True)
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)  # what an interrupted attempt left (metrics, tensorboard, checkpoints)
    os.makedirs(run_dir)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    with open(os.path.join(run_dir, "command.sh"), "w") as f:
        f.write("#!/usr/bin/env bash\n" + " \\\n  ".join(shlex.quote(c) for c in cmd) + "\n")
    log_path = os.path.join(run_dir, "train.log")
    stop = threading.Event()
    progress = {"done": 0}

    def follow():  # the demo's progress bar follows the run's logged steps
        while not stop.wait(1.0):
            now = _train_rows(metrics)
            if bar is not None and now > progress["done"]:
                bar.update(now - progress["done"])
                progress["done"] = now

    watcher = threading.Thread(target=follow, daemon=True)
    t0 = time.time()
    watcher.start()
    error = None
    try:
        with _output_to(log_path):
            try:
                train_local.main(cmd[3:])
            except BaseException as err:  # SystemExit from a bad flag too
                traceback.print_exc()
                error = err
    finally:
        stop.set()
        watcher.join()
        gc.collect()
    if bar is not None and total_steps > progress["done"]:
        bar.update(total_steps - progress["done"])
    status = {"returncode": 0 if error is None else 1, "seconds": round(time.time() - t0, 1), "log": log_path}
    if error is not None:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"training run failed ({type(error).__name__}: {error}); see {log_path}:\n{tail}")
    _write_json(os.path.join(run_dir, STATUS_FILE), dict(status, args=cmd[3:]))
    return status


def _write_json(path: str, value) -> None:
    """Atomic: an interrupted demo never leaves half a file for the report or the next run."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(path + ".tmp", path)


def analyze_segments(task_name: str, warm_model: str, statuses: dict, preset: Preset) -> dict:
    """demo/analysis.py on the warm start and on the first SAPO run's final policy."""
    from openrlhf_sapo.demo.analysis import analyze

    task = get_task(task_name)
    sapo = sorted((s for s in statuses.values() if s["method"] == "sapo"), key=lambda s: s["seed"])
    models = {"warm start": warm_model}
    if sapo:
        models[f"SAPO seed {sapo[0]['seed']}, after RL"] = os.path.join(sapo[0]["run_dir"], "model")
    return {name: analyze(path, task, n=preset.eval_n, max_new_tokens=preset.max_new_tokens, code_dir=warm_model)
            for name, path in models.items()}


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m openrlhf_sapo.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None,
                        help="output folder (default runs/demo, or runs/demo-quick with --quick: the two keep "
                             "their own warm starts); rerunning into it skips the runs that finished")
    parser.add_argument("--task", default="digits", choices=sorted(TASKS), help="digits (VLM, default) or arithmetic")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed (checks the pipeline only)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the preset's seeds")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's RL steps per run")
    parser.add_argument("--no-report", action="store_true", help="train only")
    args = parser.parse_args(argv)

    from openrlhf_sapo.demo.numerics import pin_cpu_numerics

    numerics = pin_cpu_numerics()  # before any torch kernel: same numbers on every x86-64 machine
    from tqdm.auto import tqdm

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    preset_name = "quick" if args.quick else "full"
    preset = PRESETS[preset_name]
    if args.seeds:
        preset = replace(preset, seeds=tuple(args.seeds))
    if args.steps:
        preset = replace(preset, steps=args.steps)
    out = os.path.abspath(args.out or ("runs/demo-quick" if args.quick else "runs/demo"))
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    prepared = prepare(args.task, preset, out)
    summary = {"task": args.task, "preset": preset_name, "config": asdict(preset), "methods": list(args.methods),
               "method_flags": {m: method_flags(m, "<model>", preset) for m in args.methods},
               "setup_seconds": round(time.time() - t0, 1), "numerics": numerics,
               "warm_start": prepared["warm_start"], "runs": {}, "analysis": {}, "finished": False}
    summary_path = os.path.join(out, "summary.json")
    _write_json(summary_path, summary)

    runs = [(m, s) for s in preset.seeds for m in args.methods]  # interleaved: every method gets seed 1 first
    # The bar writes to a copy of this process's stderr: each run's own output goes to its train.log.
    bar_file = os.fdopen(os.dup(2), "w", buffering=1)
    bar = tqdm(total=len(runs) * preset.steps, desc="RL steps (all runs)", unit="step", file=bar_file)
    for method, seed in runs:
        name = f"{method}_seed{seed}"
        run_dir = os.path.join(out, "runs", name)
        bar.set_postfix(run=f"{method} seed {seed}")
        cmd = train_command(method, seed, preset, prepared["model"], prepared["data_dir"], run_dir, prepared["is_vlm"])
        status = run_one(cmd, run_dir, bar, preset.steps)
        if status.pop("skipped", False):
            bar.write(f"{name}: finished in an earlier attempt ({status['seconds']:.0f} s), not run again",
                      file=bar_file)
        summary["runs"][name] = dict(status, method=method, seed=seed, run_dir=run_dir)
        _write_json(summary_path, summary)
    bar.close()
    bar_file.close()
    if "sapo" in args.methods:
        summary["analysis"] = analyze_segments(args.task, prepared["model"], summary["runs"], preset)
    summary.update(total_seconds=round(time.time() - t0, 1), finished=True)
    _write_json(summary_path, summary)
    if not args.no_report:
        from openrlhf_sapo.demo.report import write_report

        path = write_report(out)
        print(f"report: {path}")
    return summary
