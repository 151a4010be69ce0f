"""The demo tasks' reward as OpenRLHF's `reward_func(queries, prompts, labels)` (pass this file as
`--reward.remote_url`): 1.0 when the last `\\boxed{}` of the response equals the label, else 0.0
(`scores` and `extra_logs["accuracy"]` are the same number, so held-out `pass1` is accuracy).

It never raises: a malformed query scores 0, as an unanswered question would.
"""

from __future__ import annotations

import torch

from openrlhf_sapo.demo.tasks import last_boxed
from openrlhf_sapo.rewards.grading import response_from_query


def _accuracy(query, prompt, label) -> float:
    try:
        answer = last_boxed(response_from_query(query, prompt if isinstance(prompt, str) else None))
        return float(answer is not None and answer == str(label).strip())
    except Exception:  # a reward function never crashes a run
        return 0.0


def reward_func(queries, prompts, labels, **kwargs) -> dict:
    n = len(queries)
    prompts = prompts if prompts is not None and len(prompts) == n else [None] * n
    labels = labels if labels is not None and len(labels) == n else [None] * n
    accuracy = torch.tensor([_accuracy(q, p, l) for q, p, l in zip(queries, prompts, labels)], dtype=torch.float32)
    boxed = torch.tensor([float("\\boxed{" in str(q)) for q in queries], dtype=torch.float32)
    return {"rewards": accuracy, "scores": accuracy.clone(), "extra_logs": {"accuracy": accuracy, "boxed": boxed}}
