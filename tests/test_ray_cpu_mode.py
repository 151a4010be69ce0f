"""The Ray path's CPU mode, piece by piece (the whole path runs in `make e2e`, tests/cluster/e2e.py).

- option changes (utils/cpu_compat.adapt_ray_args_for_cpu) on a shipped script's real flags;
- the GPU bundles a run asks Ray for (ray_gpus_needed), against upstream's placement rules;
- the gloo weight-sync group (utils/distributed_util.py) between two real processes;
- what the driver refuses: --vllm.check_weight_sync on a GPU machine;
- seeded trainer constructors (trainer/ppo_trainer.seed_from_strategy): same seed, same prompt order.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from openrlhf_sapo import patches
from openrlhf_sapo.trainer.ppo_trainer import seed_from_strategy
from openrlhf_sapo.cli import train_ppo_ray as cli
from openrlhf_sapo.utils import cpu_compat
from openrlhf_sapo.utils.distributed_util import GlooBroadcastGroup, local_address_towards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_argv(script: str, *extra: str, **env) -> list:
    """The training flags a shipped script passes (with DRY_RUN=1 it runs the command with --dry-run,
    traced on stderr by `set -x`)."""
    import shlex

    full_env = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **env)
    done = subprocess.run(["bash", os.path.join(REPO, "examples", "scripts", script), *extra], env=full_env,
                          capture_output=True, text=True, check=True)
    trace = [line for line in done.stderr.splitlines() if line.startswith("+ ") and cli.__name__ in line]
    words = shlex.split(trace[-1][2:])
    return [w for w in words[words.index(cli.__name__) + 1:] if w != "--dry-run"]


def parsed(argv):
    flat = cli.build_parser().parse_args(argv)
    return cli.upstream_hierarchize()(flat)


def test_adapt_changes_exactly_the_cuda_only_options_of_a_shipped_script():
    args = parsed(script_argv("text/sapo.sh", MODEL_PATH="m", TRAIN_DATA="t", EVAL_DATA="e"))
    assert (args.vllm.sync_backend, args.vllm.enable_sleep, args.ds.enable_sleep) == ("nccl", True, True)
    changes = cpu_compat.adapt_ray_args_for_cpu(args)
    flags = [c.split(":")[0] for c in changes]
    assert flags == ["--ds.attn_implementation", "--vllm.sync_backend", "--vllm.enable_sleep", "--ds.enable_sleep"]
    assert args.ds.attn_implementation == "sdpa" and args.vllm.sync_backend == "gloo"
    assert not (args.vllm.enable_sleep or args.ds.enable_sleep)
    assert args.actor.gradient_checkpointing_enable  # kept with ZeRO-3 (tests/test_zero3_cpu.py)
    # untouched: everything the algorithm and the placement depend on
    assert (args.ds.zero_stage, args.train.colocate_all, args.algo.advantage.estimator) == (3, True, "sapo")
    assert cpu_compat.adapt_ray_args_for_cpu(args) == []  # idempotent


def test_adapt_pipeline_parallel_turns_eager_off():
    args = parsed(script_argv("text/sapo.sh", "--ds.zero_stage", "2", MODEL_PATH="m", VLLM_PP="2",
                              TRAIN_DATA="t", EVAL_DATA="e"))
    changes = cpu_compat.adapt_ray_args_for_cpu(args)
    assert any(c.startswith("--vllm.enforce_eager: True -> False") for c in changes)


@pytest.mark.parametrize("extra, needed", [
    ([], 2),                                                       # colocated: everything on the actor's bundles
    (["--train.async_enable"], 4),                                 # async: the engines get their own bundles
])
def test_gpus_needed_for_the_shipped_colocated_layout(extra, needed):
    # (the flags are added after the script's dry run: upstream refuses async with vLLM sleep, which
    # the script turns on and the CPU mode turns off)
    args = parsed(script_argv("text/sapo.sh", MODEL_PATH="m", NNODES="2", GPUS_PER_NODE="1", TRAIN_DATA="t",
                              EVAL_DATA="e") + extra)
    assert cpu_compat.ray_gpus_needed(args) == needed


def test_gpus_needed_without_colocation_counts_every_group():
    argv = ["--actor.model_name_or_path", "m", "--critic.model_name_or_path", "m", "--reward.remote_url", "r.py",
            "--data.prompt_dataset", "d", "--algo.advantage.estimator", "sapo", "--actor.num_gpus_per_node", "2",
            "--critic.num_gpus_per_node", "2", "--ref.num_gpus_per_node", "1", "--algo.kl.init_coef", "0.01",
            "--vllm.num_engines", "2", "--vllm.tensor_parallel_size", "2"]
    assert cpu_compat.ray_gpus_needed(parsed(argv)) == 2 + 1 + 2 + 4
    no_ref = parsed(argv[:-8] + ["--algo.kl.init_coef", "0", "--vllm.num_engines", "1"])
    assert cpu_compat.ray_gpus_needed(no_ref) == 2 + 2 + 1


def _member(rank, port, values, out):
    import torch

    group = GlooBroadcastGroup("127.0.0.1", port, rank, 3)
    for value in values:
        tensor = torch.full((4, 3), float(value)) if rank == 0 else torch.empty(4, 3)
        group.broadcast(tensor, src=0, stream=None)
        out.put((rank, tensor.sum().item()))


def test_gloo_broadcast_group_delivers_every_tensor_to_every_member():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(rank, port, [1.5, -2.0], out)) for rank in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    got = sorted(out.get(timeout=5) for _ in range(6))
    assert got == sorted((rank, 12 * v) for rank in range(3) for v in (1.5, -2.0))
    assert local_address_towards("127.0.0.1") == "127.0.0.1"


def test_check_weight_sync_is_refused_on_a_gpu_machine(monkeypatch):
    args = parsed(["--actor.model_name_or_path", "m", "--reward.remote_url", "r.py", "--data.prompt_dataset", "d",
                   "--vllm.check_weight_sync"])
    monkeypatch.setattr(cpu_compat, "has_cuda", lambda: True)
    with pytest.raises(ValueError, match="only implemented for CPU runs"):
        patches.install_for_training(args, ray_driver=True)


def test_seed_from_strategy_fixes_the_prompt_order():
    import types

    import torch

    strategy = types.SimpleNamespace(args=types.SimpleNamespace(train=types.SimpleNamespace(seed=7)))
    orders = []
    for _ in range(2):
        seed_from_strategy(("model", strategy), {})
        orders.append(torch.randperm(100).tolist())  # what a shuffling loader draws
    assert orders[0] == orders[1]
    seed_from_strategy((), {"strategy": types.SimpleNamespace(args=types.SimpleNamespace(
        train=types.SimpleNamespace(seed=8)))})
    assert torch.randperm(100).tolist() != orders[0]


def test_the_single_process_backend_starts_no_ray():
    import ray

    args = parsed(["--actor.model_name_or_path", "m", "--reward.remote_url", "r.py", "--data.prompt_dataset", "d"])
    assert patches.install_for_training(args) == []  # no ray_driver: patches only
    assert not ray.is_initialized()


def test_vllm_plugin_is_registered_and_acts_only_in_a_cpu_ray_job(monkeypatch):
    """vLLM calls the plugin in every process it starts (its engine core too, which no Ray hook
    reaches); it gives vLLM's CPU platform the declared "GPU" resource only in a CPU-mode job."""
    from importlib.metadata import entry_points

    from vllm.platforms.cpu import CpuPlatform

    assert "openrlhf_sapo.utils.cpu_compat:vllm_plugin" in {
        ep.value for ep in entry_points(group="vllm.general_plugins")}
    cpu_compat.require_vllm_plugin()  # installed with the package: no error
    monkeypatch.setattr(CpuPlatform, "ray_device_key", "")
    monkeypatch.delenv(cpu_compat.CPU_RAY_ENV, raising=False)
    cpu_compat.vllm_plugin()
    assert CpuPlatform.ray_device_key == ""  # not a CPU-mode job: vLLM untouched
    monkeypatch.setenv(cpu_compat.CPU_RAY_ENV, "1")
    cpu_compat.vllm_plugin()
    assert CpuPlatform.ray_device_key == "GPU"


def test_patched_torch_functions_are_distinct_objects():
    """torch.compile in vLLM's workers refuses one function object standing for two torch functions."""
    import torch

    cpu_compat.patch_distributed_for_cpu()
    try:
        patched = [torch.cuda.set_device, torch.cuda.synchronize, torch.cuda.current_stream]
        assert len({id(f) for f in patched}) == 3
    finally:
        cpu_compat.restore_distributed()
