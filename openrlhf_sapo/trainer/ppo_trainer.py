"""SAPO's Ray trainer actors (the counterpart of openrlhf/trainer/ppo_trainer.py and ppo_trainer_async.py).

Upstream's trainers unchanged, except that each applies SAPO's patches (patches.py) in its own Ray
worker before building anything, so the experience maker, the samples generator and the
Experience batching there are SAPO's. Async mode's generator and training actors too. The two
that build the prompt loader (PPOTrainer, GenerateSamplesActor) first seed their process with
--train.seed, so a Ray run's prompt order is reproducible, as the single-process backend's is.

The trainers also say what happens to the run's state, one line each (`RunStateMessages`):
where a resumed run continues (upstream logs its whole checkpoint state instead, data loader
included), that `--ckpt.load_enable` found no checkpoint, and every checkpoint save.
"""

from __future__ import annotations

import contextlib
import logging
import os

from ..upstream import replaces, sapo_remote_class, upstream

_PREFIX = "[openrlhf_sapo]"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Upstream's INFO lines of one call (e.g. the checkpoint-state dump) held back."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def seed_from_strategy(args, kwargs) -> None:
    """Seed torch/numpy/random with `--train.seed` before an upstream trainer builds its prompt loader
    (which draws its shuffling seed from torch's global generator); upstream never seeds that
    process, so its prompt order would differ from run to run. `strategy` is the second argument
    of PPOTrainer and GenerateSamplesActor."""
    import transformers

    strategy = kwargs["strategy"] if "strategy" in kwargs else args[1]
    transformers.set_seed(strategy.args.train.seed)


class RunStateMessages:
    """Mixed into upstream's trainers (Ray, async and single-process)."""

    def init_checkpoint_states(self):
        with _quiet("openrlhf.trainer.ppo_trainer"):
            states = super().init_checkpoint_states()
        path = os.path.join(self.args.ckpt.path, "_actor")
        step = int(states.get("global_step", 0))
        if step > 0:
            print(f"{_PREFIX} resumed from step {step} (checkpoint {path}), continuing at step {step + 1}", flush=True)
        elif self.args.ckpt.load_enable:
            print(f"{_PREFIX} --ckpt.load_enable: no checkpoint under {path}, starting at step 1", flush=True)
        return states

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        result = super().save_logs_and_checkpoints(global_step, logs_dict, client_states)
        if global_step % self.args.ckpt.save_steps == 0:
            print(f"{_PREFIX} step {global_step}: checkpoint saved under {self.args.ckpt.path} "
                  f"(tag global_step{global_step})", flush=True)
        return result


def _remote(module: str, name: str, mixin=None, before_init=None):
    """SAPO's remote subclass of upstream's `module.name`, registered as its replacement there."""
    remote = sapo_remote_class(upstream(module, name), mixin=mixin, before_init=before_init)
    return replaces(module, name)(remote)


# train() imports PPOTrainer lazily, so rebinding it in its module is enough.
SapoPPOTrainer = _remote("openrlhf.trainer.ppo_trainer", "PPOTrainer", RunStateMessages, seed_from_strategy)
SapoPPOTrainerAsync = _remote("openrlhf.trainer.ppo_trainer_async", "PPOTrainerAsync")
SapoTrainingActor = _remote("openrlhf.trainer.ppo_trainer_async", "TrainingActor", RunStateMessages)
SapoGenerateSamplesActor = _remote("openrlhf.trainer.ppo_trainer_async", "GenerateSamplesActor",
                                   before_init=seed_from_strategy)
