"""ZeRO-3 across two real processes on CPU (gloo): upstream's Actor loads a checkpoint exactly.

DeepSpeed 0.19.6's coalesced all-gather waits only for the last of its async gloo all-gathers, so
transformers' ZeRO-3 loading could copy a module's checkpoint tensors into a buffer another
all-gather was still filling: about every second start then held garbage (1e38 or NaN) in some
attention projections, and the first step had NaN values or entropies. The CPU mode turns on
DeepSpeed's `stage3_allgather_sequential` (`cpu_compat.with_sequential_zero3_allgather`).

Here two spawned processes (rank 0 and 1 over gloo, the CPU mode's real set-up) build upstream's
`openrlhf.models.Actor` from the ZeRO-3 config of upstream's strategy LOADS times each, and every
parameter gathered afterwards must equal the checkpoint. Without the option, measured: 2 of 2 runs
of this test failed (one attention projection wrong in the 3rd or 4th load; about 1 load in 4 here).
"""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import socket

import pytest
import torch

from openrlhf_sapo.utils import cpu_compat

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU mode's ZeRO-3 set-up; GPUs use NCCL"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADS = 8


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load_and_compare(rank: int, port: int, model_path: str, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                          LOCAL_RANK="0")
        cpu_compat.apply()
        cpu_compat.patch_distributed_for_cpu()
        import deepspeed
        from openrlhf.models import Actor
        from openrlhf.utils import get_strategy
        from safetensors.torch import load_file

        from openrlhf_sapo.cli.train_ppo_ray import parse_args

        args = parse_args([
            "--actor.model_name_or_path", model_path, "--critic.model_name_or_path", model_path,
            "--reward.remote_url", os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py"),
            "--vllm.num_engines", "0", "--actor.num_gpus_per_node", "2", "--critic.num_gpus_per_node", "2",
            "--ds.zero_stage", "3", "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
            "--rollout.batch_size", "4", "--rollout.micro_batch_size", "2",
            "--train.batch_size", "4", "--train.micro_batch_size", "2",
        ])
        strategy = get_strategy(args)
        strategy.setup_distributed()
        checkpoint = {}
        for shard in glob.glob(os.path.join(model_path, "*.safetensors")):
            checkpoint.update(load_file(shard))
        config = strategy.get_ds_train_config()
        loads = []
        for _ in range(LOADS):
            model = Actor(model_path, attn_implementation="sdpa", param_dtype="bf16", ds_config=config).model
            wrong = []
            for name, param in model.named_parameters():
                with deepspeed.zero.GatheredParameters([param]):
                    if not torch.equal(param.data, checkpoint[name].to(param.dtype)):
                        wrong.append(name)
            loads.append(wrong)
        queue.put((rank, config["zero_optimization"], loads))
    except BaseException:
        import traceback

        queue.put((rank, None, traceback.format_exc()))


def test_zero3_loading_across_two_gloo_ranks_equals_the_checkpoint(tmp_path):
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2

    model_path = build_tiny_qwen2(str(tmp_path / "model"))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_load_and_compare, args=(rank, port, model_path, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        results = sorted(queue.get(timeout=300) for _ in procs)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for rank, zero, loads in results:
        assert zero is not None, f"rank {rank} failed:\n{loads}"
        assert zero["stage"] == 3 and zero["stage3_allgather_sequential"] is True
        assert loads == [[]] * LOADS, f"rank {rank}: parameters that differ from the checkpoint, per load: {loads}"


def test_sequential_allgather_is_set_only_for_zero3():
    assert cpu_compat.with_sequential_zero3_allgather({"zero_optimization": {"stage": 3}}) == {
        "zero_optimization": {"stage": 3, "stage3_allgather_sequential": True}}
    assert cpu_compat.with_sequential_zero3_allgather({"zero_optimization": {"stage": 2}}) == {
        "zero_optimization": {"stage": 2}}
