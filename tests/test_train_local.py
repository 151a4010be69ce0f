"""The single-process backend (`python -m openrlhf_sapo.cli.train_local`), run for real on tiny
models in this process: upstream's PPOTrainer, samples generator, agent executor and DeepSpeed
workers (ZeRO-2, gloo), SAPO's experience maker and losses, the HF rollout engine.

Each run is 2 RL steps on a tiny Qwen2 (text arithmetic) or a tiny Qwen2.5-VL (digit images).
The first run in a fresh environment compiles DeepSpeed's CPU ops (about 1-2 min, then cached).
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from openrlhf_sapo.cli import train_local

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="CPU runs; on a GPU the same code runs without patches"),
]

REWARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "openrlhf_sapo", "demo",
                      "reward_func.py")
STEPS, PROMPTS = 2, 8


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from openrlhf_sapo.demo.data import write_split
    from openrlhf_sapo.demo.tasks import get_task
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2, build_tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("local")
    out = {}
    for name, build in (("arithmetic", lambda p: build_tiny_qwen2(p, hidden=64, heads=2)),
                        ("digits", build_tiny_qwen2_5_vl)):
        model = build(str(root / f"{name}_model"))
        task = get_task(name)
        data = str(root / f"{name}_data")
        write_split(task, data, "train", STEPS * PROMPTS)
        write_split(task, data, "heldout", 4)
        out[name] = {"model": model, "data": data}
    return out


ESTIMATORS = {
    "ppo": ["--algo.advantage.estimator", "gae", "--algo.advantage.lambd", "0.95"],
    "sapo": ["--algo.advantage.estimator", "sapo", "--algo.advantage.lambd", "0.99"],
    "grpo": ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2",
             "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", "0.01"],
    "gspo": ["--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "2",
             "--actor.policy_loss_type", "gspo"],
}
HAS_CRITIC = {"ppo", "sapo"}


def argv(tasks, tmp_path, task: str, method: str, *extra: str):
    model, data = tasks[task]["model"], tasks[task]["data"]
    prompts = PROMPTS // (2 if method in ("grpo", "gspo") else 1)
    flags = [
        "--actor.model_name_or_path", model,
        "--reward.remote_url", REWARD,
        "--data.prompt_dataset", os.path.join(data, "train.jsonl"), "--data.input_key", "prompt",
        "--data.label_key", "label", "--data.apply_chat_template", "--data.max_samples", str(STEPS * prompts),
        "--eval.dataset", os.path.join(data, "heldout.jsonl"), "--eval.steps", str(STEPS),
        "--eval.temperature", "0", "--eval.n_samples_per_prompt", "1", "--local.eval_at_start",
        "--ckpt.best_metric_key", "none",
        "--rollout.batch_size", str(prompts), "--rollout.micro_batch_size", "4", "--rollout.max_new_tokens", "12",
        "--data.max_len", "96", "--train.batch_size", "4", "--train.micro_batch_size", "2",
        "--actor.adam.lr", "1e-3", "--actor.lr_warmup_ratio", "0",
        "--ds.zero_stage", "2", "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
        "--ckpt.path", str(tmp_path / "ckpt"), "--ckpt.output_dir", str(tmp_path / "model"),
        "--logger.tensorboard_dir", str(tmp_path / "tb"), "--local.metrics_jsonl", str(tmp_path / "metrics.jsonl"),
        *ESTIMATORS[method],
    ]
    if method in HAS_CRITIC:
        flags += ["--critic.model_name_or_path", model, "--critic.adam.lr", "1e-3", "--critic.lr_warmup_ratio", "0"]
    if task == "digits":
        flags += ["--data.image_key", "images"]
    return flags + list(extra)


def rows(tmp_path):
    with open(tmp_path / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


class Spy:
    """Captures the trainer of a run (its workers, engine) at the start of fit()."""

    def __init__(self, monkeypatch, before_fit=None):
        from openrlhf_sapo.trainer.local.ppo_trainer import LocalPPOTrainer

        self.trainer = None
        fit = LocalPPOTrainer.fit

        def spy_fit(trainer, *args, **kwargs):
            self.trainer = trainer
            if before_fit:
                before_fit(trainer)
            return fit(trainer, *args, **kwargs)

        monkeypatch.setattr(LocalPPOTrainer, "fit", spy_fit)


def actor_params(trainer) -> dict:
    model = trainer.actor_model_group.worker.actor.model.module
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("task", ["arithmetic", "digits"])
@pytest.mark.parametrize("method", ["ppo", "sapo", "grpo", "gspo"])
def test_each_estimator_trains_on_both_tasks(tasks, tmp_path, monkeypatch, method, task):
    extra = ["--algo.kl.init_coef", "0.001"] if method in ("ppo", "sapo") else []  # KL in the reward: a reference model
    if method in ("grpo", "gspo"):
        extra.append("--logger.policy_entropy")  # PPO runs without it: no entropy pass, as upstream
    spy = Spy(monkeypatch)
    result = train_local.train(train_local.parse_args(argv(tasks, tmp_path, task, method, *extra)))

    # Every run here has a KL term (upstream's default coefficient for gspo), so a reference model.
    expected_workers = {"actor", "ref"} | ({"critic"} if method in HAS_CRITIC else set())
    assert set(result["workers"]) == expected_workers
    logged = rows(tmp_path)
    train = [r for r in logged if r["kind"] == "train"]
    evals = [r for r in logged if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [0, STEPS]  # at start, then every --eval.steps
    assert f"eval_{task}_pass1" in evals[0]
    for row in train:
        for key in ("policy_loss", "rollout/reward_mean", "rollout/response_length_mean"):
            assert isinstance(row.get(key), float) and math.isfinite(row[key]), (key, row.get(key))
        assert ("policy_entropy" in row) == (method != "ppo")
        if method != "ppo":
            assert math.isfinite(row["policy_entropy"]) and row["policy_entropy"] > 0
        assert ("critic_loss" in row) == (method in HAS_CRITIC)
        assert ("critic/explained_variance" in row) == (method in HAS_CRITIC)
        if method in HAS_CRITIC:
            assert math.isfinite(row["critic/explained_variance"]) and row["critic/explained_variance"] <= 1
        assert ("sapo/segments_per_response" in row) == (method == "sapo")
        if method == "sapo":
            assert row["sapo/segments_per_response"] >= 1
        assert "kl" in row and math.isfinite(row["kl"])
    assert result["generated_tokens"] > 0
    assert os.path.exists(tmp_path / "model" / "config.json")
    assert os.listdir(tmp_path / "tb")  # upstream's tensorboard logger wrote the run

    # The rollout engine generates with exactly the trained weights (synced after every step).
    engine = spy.trainer.rollout_engine
    trained = actor_params(spy.trainer)
    for name, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach().float(), trained[name], rtol=0, atol=0)
    if method in HAS_CRITIC:  # (GRPO on a random model: every reward 0, zero advantages, no update)
        assert any(not torch.equal(p, q) for p, q in zip(trained.values(), initial_params(tasks[task]["model"]).values()))


def initial_params(path) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if hasattr(AutoConfig.from_pretrained(path), "vision_config") else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=torch.bfloat16)
    return {name: p.detach().float() for name, p in model.named_parameters()}


def test_vlm_critic_sees_the_images(tasks, tmp_path, monkeypatch):
    calls = []

    def hook(module, args, kwargs):
        calls.append(("pixel_values" in kwargs and kwargs["pixel_values"] is not None, torch.is_grad_enabled()))

    def install(trainer):
        critic = trainer.critic_model_group.worker.critic
        getattr(critic, "module", critic).register_forward_pre_hook(hook, with_kwargs=True)

    Spy(monkeypatch, before_fit=install)
    train_local.train(train_local.parse_args(argv(tasks, tmp_path, "digits", "sapo")))
    experience = [seen for seen, grad in calls if not grad]
    training = [seen for seen, grad in calls if grad]
    assert experience and training  # the critic ran in the experience forward and in its training step
    assert all(experience) and all(training), calls


def test_resume_restores_the_checkpoint(tasks, tmp_path, monkeypatch, capsys):
    """A run stopped after step 1 (its checkpoint saved) resumes at step 2 from exactly the saved
    actor weights, scheduler position and data position; the rollout engine gets those weights."""
    from openrlhf_sapo.trainer.local.ppo_trainer import LocalPPOTrainer

    flags = argv(tasks, tmp_path, "arithmetic", "sapo", "--ckpt.save_steps", "1")
    saved = {}
    save = LocalPPOTrainer.save_logs_and_checkpoints

    class Crash(RuntimeError):
        pass

    def save_then_crash(trainer, global_step, logs_dict=None, client_states=None):
        save(trainer, global_step, logs_dict, client_states)
        if global_step == 1:
            saved["params"] = actor_params(trainer)
            saved["scheduler"] = trainer.actor_model_group.worker.actor_scheduler.last_epoch
            saved["consumed"] = client_states["total_consumed_prompts"]
            raise Crash("stopped after the step-1 checkpoint")

    monkeypatch.setattr(LocalPPOTrainer, "save_logs_and_checkpoints", save_then_crash)
    with pytest.raises(Crash):
        train_local.train(train_local.parse_args(flags))
    monkeypatch.setattr(LocalPPOTrainer, "save_logs_and_checkpoints", save)
    ckpt = str(tmp_path / "ckpt")
    out = capsys.readouterr().out
    assert f"[openrlhf_sapo] step 1: checkpoint saved under {ckpt} (tag global_step1)" in out
    assert "checkpoint_states" not in out  # upstream's state dump is held back
    with pytest.raises(SystemExit):  # the run is there: a rerun without --resume is refused
        train_local.parse_args(flags)
    assert f"holds a run already (checkpoint {ckpt}/_actor): pass --resume to continue it" in capsys.readouterr().err

    resumed = {}

    def before_fit(trainer):
        resumed["params"] = actor_params(trainer)
        resumed["scheduler"] = trainer.actor_model_group.worker.actor_scheduler.last_epoch
        resumed["states"] = trainer.actor_model_group.worker.get_checkpoint_states()

    spy = Spy(monkeypatch, before_fit=before_fit)
    os.remove(tmp_path / "metrics.jsonl")
    train_local.train(train_local.parse_args(flags + ["--resume"]))
    out = capsys.readouterr().out
    assert f"[openrlhf_sapo] resumed from step 1 (checkpoint {ckpt}/_actor), continuing at step 2" in out

    for name, value in saved["params"].items():
        torch.testing.assert_close(resumed["params"][name], value, rtol=0, atol=0)
    assert resumed["scheduler"] == saved["scheduler"]
    assert resumed["states"]["global_step"] == 1
    assert resumed["states"]["total_consumed_prompts"] == saved["consumed"]
    assert [r["step"] for r in rows(tmp_path) if r["kind"] == "train"] == [2]  # continues, no eval at start
    engine = spy.trainer.rollout_engine
    assert engine.generated_tokens > 0


@pytest.mark.parametrize("flags,message", [
    (["--ds.tensor_parallel_size", "2"], "several processes"),
    (["--ds.lora.rank", "8"], "LoRA"),
    (["--ds.packing_samples"], "flash-attention"),
    (["--vllm.num_engines", "2"], "exactly one rollout engine"),
    (["--critic.num_gpus_per_node", "2"], "world size 1"),
    (["--train.async_enable"], "async_enable"),
])
def test_what_one_process_cannot_do_is_refused(tasks, tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        train_local.parse_args(argv(tasks, tmp_path, "arithmetic", "sapo", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_same_seed_gives_the_same_run(tasks, tmp_path):
    """Seeded end to end: prompt order (the trainer's loader draws its shuffle seed from torch's
    generator when built), sampling, updates. Two runs with one seed log identical numbers."""
    logs = []
    for name in ("a", "b"):
        run = tmp_path / name
        run.mkdir()
        train_local.train(train_local.parse_args(argv(tasks, run, "arithmetic", "sapo", "--train.seed", "7")))
        logs.append([{k: v for k, v in r.items() if k != "time" and not k.startswith("timing/")} for r in rows(run)])
    assert logs[0] == logs[1]


def test_fp32_training_on_cpu(tasks, tmp_path, monkeypatch):
    """`--ds.param_dtype fp32` (CPU only): actor and critic train in fp32 through upstream's builders,
    and upstream's dtype conversion is put back afterwards."""
    from openrlhf.utils import utils as upstream_utils

    dtypes = {}

    def record(trainer):
        dtypes["actor"] = {p.dtype for p in trainer.actor_model_group.worker.actor.model.module.parameters()}
        dtypes["critic"] = {p.dtype for p in trainer.critic_model_group.worker.critic.module.parameters()}

    Spy(monkeypatch, before_fit=record)
    train_local.train(train_local.parse_args(argv(tasks, tmp_path, "digits", "sapo", "--algo.kl.init_coef", "0.001",
                                                  "--ds.param_dtype", "fp32")))
    assert dtypes == {"actor": {torch.float32}, "critic": {torch.float32}}
    assert [r["step"] for r in rows(tmp_path) if r["kind"] == "train"] == list(range(1, STEPS + 1))
    with pytest.raises(ValueError, match="Invalid param_dtype"):
        upstream_utils.convert_to_torch_dtype("fp32")
