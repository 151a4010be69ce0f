"""The trainer of the single-process backend (the counterpart of openrlhf/trainer/ppo_trainer.py).

Upstream's PPOTrainer itself (rollout, experience, PPO steps, evaluation, logging, checkpoints,
resume), as the class inside its Ray actor, plus two things a local run wants: every logged
step and evaluation is also appended to a JSONL file (plots and reports read it), and an
optional evaluation before the first step (the starting point of a learning curve).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Optional

import torch

from ...upstream import upstream
from ..ppo_trainer import RunStateMessages

PPOTrainer = upstream("openrlhf.trainer.ppo_trainer", "PPOTrainer").__ray_actor_class__


def _scalar(value) -> Optional[float]:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (bool, int, float)):
        return float(value)
    return None


class LocalPPOTrainer(RunStateMessages, PPOTrainer):
    def __init__(self, *args, metrics_path: Optional[str] = None, eval_at_start: bool = False,
                 rollout_engine=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.metrics_path = metrics_path
        self.eval_at_start = eval_at_start
        self.rollout_engine = rollout_engine
        self._t0 = time.time()
        if metrics_path:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)

    def record(self, kind: str, step: int, logs: Optional[dict]) -> None:
        if not self.metrics_path or not logs:
            return
        row = {"kind": kind, "step": int(step), "time": round(time.time() - self._t0, 3)}
        if self.rollout_engine is not None:
            row["generated_tokens"] = self.rollout_engine.generated_tokens
        for key, value in logs.items():
            value = _scalar(value)
            if value is not None and math.isfinite(value):
                row[key] = value
            elif value is not None:  # never silently: a non-finite metric is kept as text
                row[key] = str(value)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def save_logs_and_checkpoints(self, global_step, logs_dict=None, client_states=None):
        self.record("train", global_step, logs_dict)
        return super().save_logs_and_checkpoints(global_step, logs_dict, client_states)

    def evaluate(self, global_step, **generate_kwargs):
        logs = super().evaluate(global_step, **generate_kwargs)
        self.record("eval", global_step, logs)
        return logs

    def fit(self, global_step: int = 0) -> None:
        resuming = self.args.ckpt.load_enable and os.path.exists(os.path.join(self.args.ckpt.path, "_actor"))
        if self.eval_at_start and self.eval_dataloader is not None and not resuming:
            kwargs = dict(self.generate_kwargs, temperature=self.args.eval.temperature,
                          n_samples_per_prompt=self.args.eval.n_samples_per_prompt)
            self.evaluate(0, **kwargs)
        return super().fit(global_step)
