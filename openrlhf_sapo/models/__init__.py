"""SAPO's counterparts of `openrlhf.models`: the segment losses and the rollout entropy."""
