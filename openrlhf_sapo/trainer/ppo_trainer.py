"""SAPO's Ray trainer actors (the counterpart of openrlhf/trainer/ppo_trainer.py and ppo_trainer_async.py).

Upstream's trainers unchanged, except that each applies the seam's patches in its own Ray
worker before building anything, so the experience maker, the samples generator and the
Experience batching there are SAPO's. Async mode's generator and training actors too. The two
that build the prompt loader (PPOTrainer, GenerateSamplesActor) first seed their process with
--train.seed, so a Ray run's prompt order is reproducible, as the single-process backend's is.
"""

from __future__ import annotations

from ..seam import sapo_remote_class, seed_from_strategy, upstream

SapoPPOTrainer = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer", "PPOTrainer"), before_init=seed_from_strategy)
SapoPPOTrainerAsync = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync"))
SapoTrainingActor = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "TrainingActor"))
SapoGenerateSamplesActor = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "GenerateSamplesActor"),
                                             before_init=seed_from_strategy)
