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
import io
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


def _rank_args(rank: int, port: int, model_path: str, *extra: str):
    """This process as rank `rank` of 2 (gloo, the CPU mode's set-up) and the ZeRO-3 arguments of a run."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    cpu_compat.apply()
    cpu_compat.patch_distributed_for_cpu()
    from openrlhf_sapo.cli.train_ppo_ray import parse_args

    return parse_args([
        "--actor.model_name_or_path", model_path, "--critic.model_name_or_path", model_path,
        "--reward.remote_url", os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py"),
        "--vllm.num_engines", "0", "--actor.num_gpus_per_node", "2", "--critic.num_gpus_per_node", "2",
        "--ds.zero_stage", "3", "--ds.param_dtype", "bf16", "--ds.attn_implementation", "sdpa",
        "--rollout.batch_size", "4", "--train.batch_size", "4", "--train.micro_batch_size", "2", *extra,
    ])


def _run_two_ranks(target, *args, timeout: float = 400) -> list:
    """target(rank, port, *args, queue) in two spawned processes; their (rank, ...) results by rank.
    Both processes are joined, and killed if still alive, also on failure."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, queue)) for rank in range(2)]
    for proc in procs:
        proc.start()
    try:
        return sorted((queue.get(timeout=timeout) for _ in procs), key=lambda result: result[0])
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _load_and_compare(rank: int, port: int, model_path: str, queue) -> None:
    try:
        args = _rank_args(rank, port, model_path, "--rollout.micro_batch_size", "2")
        import deepspeed
        from openrlhf.models import Actor
        from openrlhf.utils import get_strategy
        from safetensors.torch import load_file

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
    results = _run_two_ranks(_load_and_compare, model_path, timeout=300)
    for rank, zero, loads in results:
        assert zero is not None, f"rank {rank} failed:\n{loads}"
        assert zero["stage"] == 3 and zero["stage3_allgather_sequential"] is True
        assert loads == [[]] * LOADS, f"rank {rank}: parameters that differ from the checkpoint, per load: {loads}"


def test_sequential_allgather_is_set_only_for_zero3():
    assert cpu_compat.with_sequential_zero3_allgather({"zero_optimization": {"stage": 3}}) == {
        "zero_optimization": {"stage": 3, "stage3_allgather_sequential": True}}
    assert cpu_compat.with_sequential_zero3_allgather({"zero_optimization": {"stage": 2}}) == {
        "zero_optimization": {"stage": 2}}


def _vlm_critic_under_zero3(rank: int, port: int, model_path: str, out: str, queue) -> None:
    """One rank of upstream's CriticModelActor (SAPO's worker class, DeepSpeed ZeRO-3 engine, gloo):
    experience forwards, training rounds through upstream's ppo_train, save."""
    try:
        args = _rank_args(rank, port, model_path, "--algo.advantage.estimator", "sapo", "--data.max_images_per_prompt",
                          "1", "--critic.adam.lr", "2e-3", "--critic.lr_warmup_ratio", "0", "--critic.lr_scheduler",
                          "constant", "--critic.save_value_network", "--ckpt.output_dir", out,
                          "--rollout.micro_batch_size", "1")
        from openrlhf.utils import get_strategy

        from openrlhf_sapo.algo import fixed_segment_ends
        from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActor
        from tests.tiny_vlm import image_inputs, vlm_sequences

        cls = SapoCriticModelActor.__ray_actor_class__
        worker = cls.__new__(cls)
        worker.__init__(2, rank, "127.0.0.1", port)  # applies the patches, as in a Ray worker
        worker.init_model_from_pretrained(get_strategy(args), model_path, 8)
        zero = worker.critic.zero_optimization_stage()
        sequences, attention, action = vlm_sequences(seed=rank)
        images = [image_inputs(seed=2 * rank + i) for i in range(2)]
        values = worker.forward(sequences, action, attention, mm_train_inputs_list=images)
        losses = []
        for _ in range(4):
            experience = SegmentExperience(
                sequences=sequences, attention_mask=attention, action_mask=action, values=values,
                returns=torch.full(action.shape, 0.5), segment_ends=fixed_segment_ends(action, 2), mm_train_inputs=images,
                info={})
            worker.append(experience)
            losses.append(worker.fit()["critic_loss"])
        trained = worker.forward(sequences, action, attention, mm_train_inputs_list=images)
        worker.save_model()
        buffer = io.BytesIO()  # bytes, not tensors: a queued tensor lives in this process's shared memory
        torch.save({"losses": losses, "values": trained, "sequences": sequences, "attention": attention,
                    "action": action, "images": images}, buffer)
        queue.put((rank, zero, buffer.getvalue()))
    except BaseException:
        import traceback

        queue.put((rank, None, traceback.format_exc()))


SegmentExperience = None  # bound in the worker processes (SAPO's patches must come first)


@pytest.mark.parametrize("tied", [False, True])
def test_vlm_critic_trains_and_saves_under_zero3_across_two_gloo_ranks(tmp_path, tied):
    """The paper's Geo3K critic set-up: the VLM critic under ZeRO-3 with 2 ranks, through upstream's own
    critic worker (init, forward, ppo_train, save_model); its values after training equal those of the
    saved critic loaded back in one process."""
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2_5_vl
    from openrlhf_sapo.models.vlm_critic import load_critic

    model_path = build_tiny_qwen2_5_vl(str(tmp_path / "vlm"), tie_word_embeddings=tied)
    out = str(tmp_path / "out")
    results = _run_two_ranks(_vlm_critic_under_zero3_entry, model_path, out)
    for rank, zero, result in results:
        assert zero == 3, f"rank {rank} failed:\n{result}"
    results = [(rank, zero, torch.load(io.BytesIO(data))) for rank, zero, data in results]
    for rank, zero, result in results:
        losses = result["losses"]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], (rank, losses)
        assert torch.isfinite(result["values"]).all()
    saved = load_critic(out + "_critic", "critic", param_dtype="bf16").eval()
    from openrlhf_sapo.trainer.ray.ppo_critic import takes_images
    from openrlhf.utils.vlm_utils import merge_mm_train_inputs

    assert takes_images(saved)
    for rank, _, result in results:
        with torch.no_grad():
            inputs = merge_mm_train_inputs(result["images"], "cpu")
            inputs = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
            again = saved(result["sequences"], result["action"], result["attention"], **inputs)
        torch.testing.assert_close(again.float(), result["values"].float(), rtol=2e-2, atol=2e-2)


def _vlm_critic_under_zero3_entry(*args):
    global SegmentExperience
    from openrlhf_sapo import patches

    patches.apply_patches()
    from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience as cls

    SegmentExperience = cls
    _vlm_critic_under_zero3(*args)
