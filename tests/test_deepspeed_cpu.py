"""Upstream's REAL actor and critic training (DeepSpeed ZeRO-2, bf16, gloo) through SAPO's worker
classes, on CPU, in this process and without Ray.

The arguments come from the real CLI parser (`openrlhf_sapo.cli.train_ppo_ray.parse_args`); the
workers are the classes inside SAPO's Ray remote classes, built the way Ray would build them
(`__init__(world_size=1, rank=0, ...)`, then `init_model_from_pretrained(strategy, path, max_steps)`),
so everything below `fit()` is upstream's: DeepSpeed engines, the replay buffer, the data loader,
the training loops, the optimizers. The experience batch is built from the workers' own
forwards with SAPO's algorithm functions (entropy segmenter, segment GAE).

CPU-only process set-up (`cpu_compat.patch_distributed_for_cpu`) is undone at the end, together
with the gloo process group, so later tests in the same pytest process are unaffected.
The first run JIT-compiles DeepSpeed's CPU ops `deepspeed_shm_comm` and `fused_adam` (cached under
~/.cache/torch_extensions, or $TORCH_EXTENSIONS_DIR): about 1 min 46 s cold, about 20 s warm on the
2-core CPU machine.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

from openrlhf_sapo.utils import cpu_compat

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path of the DeepSpeed workers; GPUs use Ray"),
]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, PROMPT_LEN, RESPONSE_LEN = 4, 6, 10


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    import torch.distributed as dist

    from openrlhf_sapo import patches
    from openrlhf_sapo.cli.train_ppo_ray import parse_args
    from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2

    if dist.is_initialized():
        pytest.skip("a torch.distributed process group is already initialised in this process")
    path = build_tiny_qwen2(str(tmp_path_factory.mktemp("tiny_qwen2")))
    args = parse_args(
        [
            "--actor.model_name_or_path", path,
            "--critic.model_name_or_path", path,
            "--algo.advantage.estimator", "sapo",
            "--reward.remote_url", os.path.join(REPO, "openrlhf_sapo", "rewards", "math_reward.py"),
            "--vllm.num_engines", "0",
            "--actor.num_nodes", "1",
            "--actor.num_gpus_per_node", "1",
            "--critic.num_nodes", "1",
            "--critic.num_gpus_per_node", "1",
            "--ds.zero_stage", "2",
            "--ds.param_dtype", "bf16",
            "--ds.attn_implementation", "sdpa",
            "--rollout.batch_size", str(BATCH),
            "--rollout.micro_batch_size", str(BATCH),
            "--train.batch_size", str(BATCH),
            "--train.micro_batch_size", str(BATCH),
            "--data.max_len", str(PROMPT_LEN + RESPONSE_LEN),
            "--actor.adam.lr", "1e-3",
            "--critic.adam.lr", "1e-3",
            "--actor.lr_warmup_ratio", "0",
            "--critic.lr_warmup_ratio", "0",
            "--algo.kl.init_coef", "0",
            # No clipping: after an update every token's ratio reaches the loss, so the segment
            # ratio (geometric mean over the segment) is distinguishable from the token ratio.
            "--actor.eps_clip", "10",
        ]
    )
    patches.apply_patches()
    environ = dict(os.environ)  # the workers and DeepSpeed export MASTER_ADDR, RANK, LOCAL_RANK, ...
    cpu_compat.patch_distributed_for_cpu()
    try:
        from openrlhf.utils import get_strategy

        from openrlhf_sapo.trainer.ray.ppo_actor import SapoPolicyModelActor
        from openrlhf_sapo.trainer.ray.ppo_critic import SapoCriticModelActor

        port = _free_port()
        built = []
        for remote_cls in (SapoPolicyModelActor, SapoCriticModelActor):
            worker = remote_cls.__ray_actor_class__(world_size=1, rank=0, master_addr="127.0.0.1", master_port=port)
            worker.init_model_from_pretrained(get_strategy(args), path, max_steps=100)
            built.append(worker)
        yield args, *built
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        cpu_compat.restore_distributed()
        os.environ.clear()
        os.environ.update(environ)


def make_batch(args, actor, critic):
    """A SAPO experience batch: old log-probs and entropy from the actor worker's forward, values
    from the critic worker's, entropy segments, segment GAE on an outcome reward at EOS."""
    from openrlhf_sapo.algo import entropy_segment_ends, segment_gae
    from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience

    gen = torch.Generator().manual_seed(0)
    vocab = actor.tokenizer.vocab_size
    sequences = torch.randint(3, min(vocab, 60), (BATCH, PROMPT_LEN + RESPONSE_LEN), generator=gen)
    attention_mask = torch.ones_like(sequences)
    response_lengths = torch.tensor([RESPONSE_LEN, RESPONSE_LEN - 3, RESPONSE_LEN - 1, 5])
    action_mask = torch.arange(RESPONSE_LEN)[None] < response_lengths[:, None]
    attention_mask[:, PROMPT_LEN:] = action_mask.long()  # right padding after each response
    sequences = sequences.masked_fill(attention_mask == 0, actor.tokenizer.pad_token_id)

    log_probs, entropy = actor.forward(sequences, action_mask, attention_mask, return_entropy=True)
    values = critic.forward(sequences, action_mask, attention_mask)
    ends = entropy_segment_ends(entropy, action_mask, args.algo.sapo.topk_percent)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    token_rewards = torch.zeros(action_mask.shape).scatter(1, (response_lengths - 1)[:, None], rewards[:, None])
    advantages, returns = segment_gae(
        token_rewards, values.float(), action_mask, ends, args.algo.advantage.gamma, args.algo.advantage.lambd
    )
    return SegmentExperience(
        sequences=sequences,
        attention_mask=attention_mask,
        action_mask=action_mask,
        action_log_probs=log_probs,
        values=values,
        returns=returns,
        advantages=advantages,
        rewards=rewards,
        response_length=response_lengths.float(),
        total_length=(PROMPT_LEN + response_lengths).float(),
        entropy=entropy,
        segment_ends=ends,
        info={"reward": rewards},
    )


def _params(model) -> dict:
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


def _changed(before: dict, model) -> int:
    return sum(not torch.equal(before[name], p.detach().float()) for name, p in model.named_parameters())


def fit_recording_loss(actor):
    """actor.fit(), recording (positional inputs, keyword inputs, segment ends, loss) of every
    call of the actor's loss function."""
    calls = []

    def record(module, inputs, kwargs, output):
        detached = tuple(x.detach().clone() if isinstance(x, torch.Tensor) else x for x in inputs)
        calls.append((detached, kwargs, kwargs["segment_ends"].clone(), output[0].detach()))  # handed by the trainer

    handle = actor.trainer.actor_loss_fn.register_forward_hook(record, with_kwargs=True)
    try:
        return actor.fit(), calls
    finally:
        handle.remove()


def reference_loss(call, loss_fn, ratio):
    from openrlhf_sapo.algo import sapo_policy_loss

    inputs, kwargs, ends, _ = call
    log_probs, old_log_probs, advantages = (x.float() for x in inputs[:3])
    mask = kwargs["action_mask"].bool()
    return sapo_policy_loss(
        log_probs, old_log_probs, advantages, mask, ends.bool() & mask,
        loss_fn.clip_eps_low, loss_fn.clip_eps_high, loss_fn.dual_clip, ratio,
    )


def check_loss_matches_reference(call, loss_fn, status):
    loss = call[3]
    torch.testing.assert_close(loss.float(), reference_loss(call, loss_fn, "segment"), rtol=0, atol=1e-5)
    assert abs(float(status["policy_loss"]) - float(loss)) < 1e-5  # the status reports that loss


def test_upstream_deepspeed_training_through_sapo_workers(workers):
    from openrlhf_sapo.models.loss import SegmentPolicyLoss

    args, actor, critic = workers
    assert type(actor.trainer).__name__ == "SegmentActorPPOTrainer"
    loss_fn = actor.trainer.actor_loss_fn
    assert isinstance(loss_fn, SegmentPolicyLoss) and loss_fn.ratio == "segment"
    assert type(critic.trainer).__name__ == "SegmentCriticPPOTrainer"
    assert actor.strategy.stage == 2 and actor.actor.model.zero_optimization_stage() == 2

    batch = make_batch(args, actor, critic)
    assert batch.segment_ends.any() and batch.advantages.abs().sum() > 0

    # The critic worker buffers the boundary-masked copy (segment ends, value_at=end).
    critic.append(copy.deepcopy(batch))
    buffered = critic.trainer.replay_buffer.items
    assert len(buffered) == BATCH
    assert sum(int(i.action_mask.sum()) for i in buffered) == int((batch.segment_ends & batch.action_mask).sum())
    actor.append(copy.deepcopy(batch))

    actor_before, critic_before = _params(actor.actor.model), _params(critic.critic)
    actor_status, calls = fit_recording_loss(actor)
    critic_status = critic.fit()

    for status, key in ((actor_status, "policy_loss"), (critic_status, "critic_loss")):
        assert key in status and torch.isfinite(torch.tensor(float(status[key]))), status
    assert _changed(actor_before, actor.actor.model) > 0
    assert _changed(critic_before, critic.critic) > 0

    # SAPO's loss on the first micro-batch, before any update, equals the reference algorithm on
    # the same tensors (one micro-batch, one optimizer step per fit). The policy has not moved
    # yet, so every ratio is 1 here.
    assert len(calls) == 1
    check_loss_matches_reference(calls[0], loss_fn, actor_status)
    assert torch.equal(calls[0][0][0], calls[0][0][1])

    # Refit the actor on the same experiences (same old log-probs): the policy moved, so the
    # segment ratios differ from 1 and from the token ratios, the loss still equals the reference,
    # and the update lowered it.
    actor.append(copy.deepcopy(batch))
    actor_second, calls = fit_recording_loss(actor)
    assert len(calls) == 1
    inputs, kwargs, ends, loss = calls[0]
    assert not torch.equal(inputs[0], inputs[1])
    check_loss_matches_reference(calls[0], loss_fn, actor_second)
    token_ratio = reference_loss(calls[0], loss_fn, "token")
    assert abs(float(token_ratio) - float(loss)) > 1e-4  # the segment ratio is what was computed (2e-3 apart here)
    assert actor_second["policy_loss"] < actor_status["policy_loss"], (actor_status, actor_second)

    # A real learning signal: refitting the critic on the same batch lowers its value loss.
    critic.append(copy.deepcopy(batch))
    second = critic.fit()
    assert second["critic_loss"] < critic_status["critic_loss"], (critic_status, second)


def test_cpu_runs_compile_no_deepspeed_op(workers):
    """On CPU, AdamW is torch's (DeepSpeed's `torch_adam`), not the CPU FusedAdam DeepSpeed JIT-compiles
    with -march=native, and no shared-memory comm op is built: a fresh machine compiles nothing."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.comm")  # the module whose `cdb` is the live backend
    _, actor, critic = workers
    for engine in (actor.actor.model, critic.critic):
        optimizer = engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the basic optimizer
        assert type(inner) is torch.optim.AdamW, type(inner)
    assert ds_comm.cdb is not None and ds_comm.cdb.shm_comm_op is None
