"""SAPO's actor side (the counterpart of openrlhf/trainer/ray/ppo_actor.py).

- `SegmentActorPPOTrainer`: upstream's ActorPPOTrainer whose loss is `SegmentPolicyLoss`
  for the `sapo` estimator; each training step hands the micro-batch's stored segment ends
  to the loss. Installed by `patches.apply_patches()` as `ppo_actor.ActorPPOTrainer`.
  With `--vllm.check_weight_sync`, each weight sync is followed by a check that every engine
  worker loaded exactly what the actor sent (float64 sums; a mismatch raises).
- `SapoPolicyModelActor`: upstream's PolicyModelActor whose experience forward can also
  return the rollout entropy, from the same temperature-scaled logits as the old log-probs
  (chunk-wise: models/utils.py `compute_entropy`). The experience maker asks for it only where
  it is used (SAPO's entropy segmenter, `--logger.policy_entropy`).
"""

from __future__ import annotations

import math
import torch

from ...algo.soft_adaptive import TAU_NEG, TAU_POS
from ...models.loss import SOFT_ADAPTIVE, SegmentPolicyLoss, SoftAdaptivePolicyLoss
from ...models.utils import call_inputs
from ...upstream import replaces, sapo_remote_class, upstream
from ..ppo_utils.experience_maker import sapo_options

ActorPPOTrainer = upstream("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer")
merge_mm_train_inputs = upstream("openrlhf.utils.vlm_utils", "merge_mm_train_inputs")
PolicyModelActor = upstream("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor")


def actor_loss_for(args, upstream_loss):
    """The actor's loss: SAPO's segment-ratio loss for the sapo estimator, the Soft Adaptive PO baseline for
    --actor.policy_loss_type soft_adaptive, else upstream's own (each with every setting of upstream's)."""
    if args.algo.advantage.estimator == "sapo":
        return SegmentPolicyLoss.like(upstream_loss, ratio=sapo_options(args)["ratio"])
    if args.actor.policy_loss_type == SOFT_ADAPTIVE:
        return SoftAdaptivePolicyLoss.like(upstream_loss, tau_pos=getattr(args.actor, "soft_adaptive_tau_pos", TAU_POS),
                                           tau_neg=getattr(args.actor, "soft_adaptive_tau_neg", TAU_NEG))
    return upstream_loss


@replaces("openrlhf.trainer.ray.ppo_actor", "ActorPPOTrainer")
class SegmentActorPPOTrainer(ActorPPOTrainer):
    def __init__(self, strategy, *args, **kwargs):
        super().__init__(strategy, *args, **kwargs)
        self.is_sapo = strategy.args.algo.advantage.estimator == "sapo"
        self.actor_loss_fn = actor_loss_for(strategy.args, self.actor_loss_fn)

    def broadcast_to_vllm(self):
        super().broadcast_to_vllm()
        if getattr(self.args.vllm, "check_weight_sync", False):
            self.check_weight_sync()

    def check_weight_sync(self) -> dict:
        """Compare what the engines loaded in the last sync with the actor's weights (all ranks take
        part: ZeRO-3 gathers each parameter). Prints one line; raises on a mismatch."""
        import deepspeed
        import ray

        from .vllm_worker_wrap import parameters_checksum

        model = self.actor.model.module
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not getattr(self.actor, "is_vlm", False)]
        sent = {"sum": 0.0, "sum_sq": 0.0, "count": 0}
        for name, param in named:
            with deepspeed.zero.GatheredParameters([param], enabled=self.args.ds.zero_stage == 3):
                part = parameters_checksum([(name, param.data)])
            sent = {key: sent[key] + part[key] for key in sent}
        if torch.distributed.get_rank() != 0:
            return sent
        if not all(math.isfinite(sent[key]) for key in ("sum", "sum_sq")):
            raise RuntimeError(f"weight sync check: the actor's weights are not finite ({sent}): training diverged")
        received = ray.get([engine.last_sync_checksum.remote() for engine in self.vllm_engines])
        nodes = set()
        for i, workers in enumerate(received):
            for worker in workers if isinstance(workers, list) else [workers]:
                nodes.add((worker or {}).get("node"))
                ok = worker is not None and worker["count"] == sent["count"] and all(
                    abs(worker[key] - sent[key]) <= 1e-9 * max(1.0, abs(sent[key])) for key in ("sum", "sum_sq"))
                if not ok:
                    raise RuntimeError(f"weight sync check failed: engine {i} loaded {worker}, the actor holds {sent}")
        where = " ".join(sorted(n for n in nodes if n)) or "unknown"
        print(f"[openrlhf_sapo] weight sync check: {len(received)} engines hold the actor's weights "
              f"(count {sent['count']}, sum {sent['sum']:.9g}, sum_sq {sent['sum_sq']:.9g}); "
              f"engine workers on nodes {where}", flush=True)
        return sent

    def training_step(self, experience, *args, **kwargs):
        if not self.is_sapo:
            return super().training_step(experience, *args, **kwargs)
        if getattr(experience, "segment_ends", None) is None:
            raise RuntimeError(
                "a SAPO training step got an experience without segment_ends: it was not made by "
                "SegmentExperienceMaker, or an upstream batching path dropped the field"
            )
        with call_inputs(self.actor_loss_fn, segment_ends=experience.segment_ends):
            return super().training_step(experience, *args, **kwargs)


class SapoPolicyModelActorMixin:
    """Methods SAPO adds to the actor's Ray worker."""

    def init_model_from_pretrained(self, strategy, *args, **kwargs):
        result = super().init_model_from_pretrained(strategy, *args, **kwargs)
        import ray

        # where each rank landed (multi-node placement is otherwise only visible in Ray's dashboard)
        print(f"[openrlhf_sapo] actor rank {torch.distributed.get_rank()}/{torch.distributed.get_world_size()} "
              f"on node {ray.util.get_node_ip_address()}", flush=True)
        return result

    def forward(self, sequences, action_mask=None, attention_mask=None, packed_seq_lens=None,
                mm_train_inputs_list=None, return_entropy: bool = False):
        """Upstream's experience forward; with `return_entropy` it also returns the rollout entropy of
        the response tokens, from the same temperature-scaled logits as the old log-probs (upstream's
        Actor computes it, chunk-wise without gradients: models/utils.py `compute_entropy`)."""
        if not return_entropy:
            return super().forward(sequences, action_mask, attention_mask, packed_seq_lens, mm_train_inputs_list)
        device = torch.cuda.current_device()
        mm_inputs = {}
        if mm_train_inputs_list and getattr(self.actor, "is_vlm", False):
            mm_inputs = merge_mm_train_inputs(mm_train_inputs_list, device)
        action_mask = action_mask.to(device)
        self.actor.eval()
        with torch.no_grad():
            log_probs, output = self.actor(sequences.to(device), action_mask, attention_mask.to(device),
                                           ring_attn_group=self.strategy.ring_attn_group, return_output=True,
                                           return_entropy=True, **mm_inputs)
        self.actor.train()
        entropy = output.entropy[:, -action_mask.shape[1] :] * action_mask
        return log_probs.to("cpu"), entropy.to("cpu")


SapoPolicyModelActor = replaces("openrlhf.trainer.ray.ppo_actor", "PolicyModelActor", also_in=(
    "openrlhf.cli.train_ppo_ray",))(sapo_remote_class(PolicyModelActor, SapoPolicyModelActorMixin))
