"""`SegmentExperienceMaker`: OpenRLHF's RemoteExperienceMaker with SAPO's `sapo` estimator.

Everything upstream does stays upstream's (model dispatch, KL, length penalties, group
baselines, `compute_reward`); the subclass adds, for `--algo.advantage.estimator sapo`:
  1. the actor's experience forward also returns the rollout entropy (`return_entropy`) where
     it is used: SAPO's entropy segmenter keeps it in the experience, and any estimator logs
     its mean as `policy_entropy` with `--logger.policy_entropy` (or SAPO's entropy segmenter).
     Otherwise the experience forward costs what upstream's does;
  2. segment ends, computed once per sample by the configured segmenter and stored with the
     experience (with segment statistics in `info`, logged like every (B,) info tensor);
  3. its own advantage step (`compute_segment_advantages_and_returns`): upstream's reward shaping
     functions (length penalties, the KL-shaped clipped token rewards of `compute_reward`), then
     segment GAE with each experience's segment ends, then whitening over the whole batch and the
     advantage clamp (`--algo.sapo.adv_clip`; centring only with `--algo.advantage.no_std_norm`).
and, for gae and sapo alike, VC-PPO's decoupled critic lambda when
`--algo.advantage.critic_lambd` is set. Other estimators are untouched.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ...algo import (
    explained_variance,
    get_segmenter,
    masked_whiten,
    segment_ends,
    segment_gae,
    segment_statistics,
    value_jump_lift,
    value_jumps,
)
from ...algo.segments import value_read_positions
from ...algo.segmenters import newline_token_table, token_text_table
from ...config import SAPO_DEFAULTS, SEGMENTERS, option_flag
from ...utils.vlm_utils import vision_special_token_ids
from ...upstream import replaces, upstream
from .experience import SegmentExperience

RemoteExperienceMaker = upstream("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker")
apply_length_penalties = upstream("openrlhf.trainer.ppo_utils.length_penalty", "apply_length_penalties")
compute_reward = upstream("openrlhf.models.utils", "compute_reward")


def logs_policy_entropy(args) -> bool:
    """`--logger.policy_entropy`: log the rollout entropy for every estimator (one more full-vocabulary pass)."""
    return bool(getattr(getattr(args, "logger", None), "policy_entropy", False))


def sapo_options(args) -> Dict:
    """The `--algo.sapo.*` namespace as a dict (defaults when the CLI did not add it)."""
    sapo = getattr(args.algo, "sapo", None)
    return {**SAPO_DEFAULTS, **(vars(sapo) if sapo is not None else {})}


@replaces("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker",
          rebind_in=("openrlhf.trainer.ppo_trainer",),  # where the trainers build it
          kept_in={"openrlhf.trainer.ppo_utils.experience_maker": "defines it"})
class SegmentExperienceMaker(RemoteExperienceMaker):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_sapo = self.advantage_estimator == "sapo"
        self.sapo = sapo_options(self.args)
        self.segmenter_needs_entropy = self.is_sapo and "entropy" in get_segmenter(self.sapo["segmenter"]).needs
        self.needs_entropy = self.segmenter_needs_entropy or logs_policy_entropy(self.args)
        self._actor_refs = None
        self._entropies: Optional[List[torch.Tensor]] = None
        self._vocab_tables: Optional[Dict] = None
        self._critic_mm_inputs = None

    # ---------------------------------------------------------------- rollout entropy

    def _dispatch_forward(self, group, sync_condition, **kwargs):
        if group is self.critic_model_group and self._critic_mm_inputs is not None:
            # A VLM critic sees the images too (upstream sends the critic text only).
            kwargs["mm_train_inputs_list"] = self._critic_mm_inputs
        if group is self.actor_model_group and self.needs_entropy:
            kwargs["return_entropy"] = [True] * len(kwargs["sequences"])
            self._actor_refs = super()._dispatch_forward(group, sync_condition, **kwargs)
            return self._actor_refs
        return super()._dispatch_forward(group, sync_condition, **kwargs)

    def _flatten_results(self, refs, duplicate_factor):
        results = super()._flatten_results(refs, duplicate_factor)
        if refs is not None and refs is self._actor_refs:
            # The actor returned (log_probs, entropy) per micro-batch: keep the entropy aside.
            self._actor_refs = None
            self._entropies = [entropy for _, entropy in results]
            return [log_probs for log_probs, _ in results]
        return results

    @torch.no_grad()
    def make_experience(self, samples_list):
        vision_ids = self.vision_token_ids()
        if vision_ids:
            for samples in samples_list:
                mask_vision_tokens_in_responses(samples, vision_ids, self.tokenizer_pad_id())
        has_mm = any(s.mm_train_inputs for s in samples_list)
        self._critic_mm_inputs = [s.mm_train_inputs for s in samples_list] if has_mm else None
        try:
            experiences = super().make_experience(samples_list)
        finally:
            self._critic_mm_inputs = None
        entropies, self._entropies = self._entropies, None
        for i, experience in enumerate(experiences):
            if entropies is not None:
                mask = experience.action_mask.bool()
                experience.info["policy_entropy"] = (entropies[i] * mask).sum(1) / mask.sum(1).clamp(min=1)
                if self.is_sapo:  # the segmenter's input, and the boundary-entropy statistic
                    experience.entropy = entropies[i]
            if self.is_sapo:
                self.segment(experience)
        if entropies is not None:
            log_value_jump_lift(experiences, entropies)
        return experiences

    # ---------------------------------------------------------------- segmentation

    def segment(self, experience) -> None:
        """Compute and store the experience's segment ends and log their statistics."""
        mask = experience.action_mask.bool()
        name = self.sapo["segmenter"]
        inputs = {
            "entropy": experience.entropy,
            "log_probs": experience.action_log_probs,
            "token_ids": experience.sequences[:, -mask.shape[1] :],
        }
        spec = SEGMENTERS[name]
        options = {table: self.vocab_tables()[table] for table in spec.vocabulary}
        options.update({o.argument: self.sapo[option_flag(name, o)] for o in spec.options})
        needed = {k: inputs[k] for k in spec.needs}
        experience.segment_ends = segment_ends(name, mask, **needed, **options)
        stats = segment_statistics(mask, experience.segment_ends, experience.entropy)
        experience.info.update({f"sapo/{k}": v for k, v in stats.items()})

    def vocab_tables(self) -> Dict:
        """Token texts and the newline table, built once per run from the tokenizer."""
        if self._vocab_tables is None:
            tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a VLM processor wraps one
            texts = token_text_table(tokenizer)
            self._vocab_tables = {"token_texts": texts, "newline_table": newline_token_table(texts)}
        return self._vocab_tables

    # ---------------------------------------------------------------- VLM guard

    def vision_token_ids(self) -> set:
        """Ids of the processor's vision tokens (empty for a text tokenizer)."""
        if getattr(self.tokenizer, "tokenizer", None) is None:
            return set()
        return set(vision_special_token_ids(self.tokenizer))

    def tokenizer_pad_id(self) -> int:
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---------------------------------------------------------------- advantages

    @torch.no_grad()
    def compute_advantages_and_returns(self, experiences):
        if self.is_sapo:
            experiences = self.compute_segment_advantages_and_returns(experiences)
        else:
            experiences = super().compute_advantages_and_returns(experiences)
        self.log_explained_variance(experiences)
        return experiences

    def compute_segment_advantages_and_returns(self, experiences):
        """SAPO's advantage step (spec 2), with upstream's reward shaping for a critic estimator: length
        penalties, the group reward spread metric, the KL-shaped, clipped per-token rewards of
        upstream's `compute_reward`; then segment GAE with each experience's own segment ends; then
        whitening and the clamp over the whole batch."""
        args = self.args
        for experience in experiences:  # at least fp32 for penalties and statistics, as upstream
            experience.rewards = experience.rewards.to(torch.promote_types(experience.rewards.dtype, torch.float32))
        apply_length_penalties(experiences, args)
        log_group_reward_std(experiences, args.rollout.n_samples_per_prompt)
        for experience in experiences:
            reward = compute_reward(experience.rewards, self.kl_ctl.value, experience.kl,
                                    action_mask=experience.action_mask, reward_clip_range=args.reward.clip_range)
            experience.advantages, experience.returns = self.segment_advantages_and_returns(
                experience.values, reward, experience.action_mask, experience.segment_ends)
            experience.info["return"] = reward.sum(dim=-1)
            experience.kl = None
        self.whiten(experiences, center_only=args.algo.advantage.no_std_norm)
        return experiences

    def log_explained_variance(self, experiences) -> None:
        """The critic's explained variance of its regression targets (spec 8), over the whole batch
        and the positions it is trained on: every response token for gae, the tokens whose values
        the segment GAE read (segment ends or starts) for sapo."""
        if not experiences or any(e.values is None or e.returns is None for e in experiences):
            return
        masks = []
        for e in experiences:
            mask = e.action_mask.bool()
            if self.is_sapo:
                mask = value_read_positions(mask, e.segment_ends.bool() & mask, self.sapo["value_at"])
            masks.append(mask.flatten())
        ev = explained_variance(torch.cat([e.values.float().flatten() for e in experiences])[None],
                                torch.cat([e.returns.float().flatten() for e in experiences])[None],
                                torch.cat(masks)[None])
        for e in experiences:
            e.info["critic/explained_variance"] = ev.expand(e.action_mask.shape[0]).clone()

    def critic_lambd(self, lambd: float) -> float:
        """VC-PPO's decoupled critic lambda (`--algo.advantage.critic_lambd`), else the policy's."""
        critic_lambd = getattr(self.args.algo.advantage, "critic_lambd", None)
        return lambd if critic_lambd is None else critic_lambd

    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        """Upstream's token GAE (the gae estimator); the critic's returns with their own lambda (VC-PPO)."""
        advantages, returns = super().get_advantages_and_returns(values, rewards, action_mask, gamma, lambd)
        if self.critic_lambd(lambd) != lambd:
            returns = super().get_advantages_and_returns(values, rewards, action_mask, gamma, self.critic_lambd(lambd))[1]
        return advantages, returns

    def segment_advantages_and_returns(self, values, rewards, action_mask, segment_ends):
        """Segment GAE (spec 2) of one experience; the critic's returns with their own lambda (VC-PPO)."""
        if segment_ends is None:
            raise RuntimeError("segment GAE was asked for an experience without segment ends (not segmented by "
                               "SegmentExperienceMaker.make_experience)")
        gamma, lambd = self.args.algo.advantage.gamma, self.args.algo.advantage.lambd
        mask, value_at = action_mask.bool(), self.sapo["value_at"]
        advantages, returns = segment_gae(rewards, values, mask, segment_ends, gamma, lambd, value_at)
        if self.critic_lambd(lambd) != lambd:
            returns = segment_gae(rewards, values, mask, segment_ends, gamma, self.critic_lambd(lambd), value_at)[1]
        return advantages, returns

    def whiten(self, experiences, center_only: bool) -> None:
        """Whiten advantages over every valid token of the batch, then clamp (spec 2)."""
        flat = torch.cat([e.advantages.float().flatten() for e in experiences])[None]
        mask = torch.cat([e.action_mask.bool().flatten() for e in experiences])[None]
        clamp = self.sapo["adv_clip"] or None
        if center_only:
            mean = flat[mask].mean() if mask.any() else flat.new_zeros(())
            whitened = torch.where(mask, flat - mean, torch.zeros_like(flat))
            whitened = whitened.clamp(-clamp, clamp) if clamp else whitened
        else:
            whitened = masked_whiten(flat, mask, clamp=clamp)
        # clone: a view would keep the whole batch's storage, and pickling it (Ray) ships all of it
        for experience, chunk in zip(experiences, whitened[0].split([e.advantages.numel() for e in experiences])):
            experience.advantages = chunk.view_as(experience.advantages).clone()


def mask_vision_tokens_in_responses(samples, vision_ids: set, pad_id: int) -> int:
    """A sampled response may contain vision special tokens (`<|image_pad|>`...), which a VLM
    cannot take as input outside the processor's layout ("Image features and image tokens do
    not match"). Replace them by padding and drop them from the action mask, so neither the
    actor nor the critic forward crashes and no loss is computed on them. Returns the count."""
    width = samples.action_mask.shape[1]
    response = samples.sequences[:, -width:]
    bad = torch.isin(response, torch.tensor(sorted(vision_ids), device=response.device)) & samples.action_mask.bool()
    count = int(bad.sum())
    if count:
        response[bad] = pad_id  # a view into sequences: edits the sample in place
        samples.action_mask = samples.action_mask & ~bad if samples.action_mask.dtype == torch.bool else samples.action_mask * ~bad
    return count


def log_value_jump_lift(experiences, entropies) -> None:
    """`critic/value_jump_lift_q<q>` (paper Fig. 3): how much larger the critic's value jumps are at the
    tokens of top entropy than at all tokens, pooled over the step's batch, for every critic estimator
    whose rollout entropy was computed (SAPO's entropy segmenter, --logger.policy_entropy)."""
    if not experiences or any(e.values is None for e in experiences):
        return
    pairs = [value_jumps(e.values, h, e.action_mask.bool()) for e, h in zip(experiences, entropies)]
    lifts = value_jump_lift(torch.cat([j for j, _ in pairs]), torch.cat([h for _, h in pairs]))
    for e in experiences:
        for q, lift in lifts.items():
            e.info[f"critic/value_jump_lift_q{round(100 * q)}"] = lift.expand(e.action_mask.shape[0]).clone()


def log_group_reward_std(experiences, n_samples_per_prompt: int) -> None:
    """`group_reward_std`: the spread of the rewards among each prompt's samples, logged per sample as
    upstream logs it for every estimator (`index` is each sample's position in prompt order)."""
    if n_samples_per_prompt <= 1:
        return
    index = torch.tensor([i for experience in experiences for i in experience.index])
    rewards = torch.cat([experience.rewards for experience in experiences])
    in_prompt_order = torch.empty_like(rewards)
    in_prompt_order[index] = rewards
    spread = in_prompt_order.view(-1, n_samples_per_prompt).std(-1).repeat_interleave(n_samples_per_prompt)[index]
    for experience, chunk in zip(experiences, spread.split([len(e.index) for e in experiences])):
        experience.info["group_reward_std"] = chunk


__all__ = ["SegmentExperienceMaker", "SegmentExperience", "sapo_options"]
