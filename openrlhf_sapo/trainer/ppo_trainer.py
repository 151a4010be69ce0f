"""SAPO's Ray trainer actors (the counterpart of openrlhf/trainer/ppo_trainer.py and ppo_trainer_async.py).

Upstream's trainers unchanged, except that each applies the seam's patches in its own Ray
worker before building anything, so the experience maker, the samples generator and the
Experience batching there are SAPO's. Async mode's generator and training actors too.
"""

from __future__ import annotations

from ..seam import sapo_remote_class, upstream

SapoPPOTrainer = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer", "PPOTrainer"))
SapoPPOTrainerAsync = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync"))
SapoTrainingActor = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "TrainingActor"))
SapoGenerateSamplesActor = sapo_remote_class(upstream("openrlhf.trainer.ppo_trainer_async", "GenerateSamplesActor"))
