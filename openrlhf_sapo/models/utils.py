"""Model-side utilities (the counterpart of openrlhf/models/utils.py)."""

from __future__ import annotations

import contextlib

import torch

from ..upstream import replaces, upstream

_upstream_compute_entropy = upstream("openrlhf.models.utils", "compute_entropy")


@torch.no_grad()
def chunked_entropy(logits: torch.Tensor, chunk_tokens: int = 1024) -> torch.Tensor:
    """Per-position entropy -sum_v p log p of the softmax over the last dim, in fp32.

    Memory-safe for long responses and large vocabularies: at most `chunk_tokens` positions
    are expanded to a full-vocabulary fp32 temporary at a time (upstream's compute_entropy
    materialises the softmax of the whole batch at once). Uses
    H = logsumexp(l) - sum softmax(l) * l, the same formula as upstream.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], chunk_tokens):
        block = flat[start : start + chunk_tokens].float()
        log_z = torch.logsumexp(block, dim=-1)
        probs = torch.softmax(block, dim=-1)
        out[start : start + chunk_tokens] = log_z - (probs * block).sum(dim=-1)
    return out.reshape(logits.shape[:-1])


@replaces("openrlhf.models.actor", "compute_entropy",
          kept_in={"openrlhf.models.utils": "defines it; the wrapper below calls it with gradients"})
def compute_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Drop-in for upstream's `compute_entropy`, rebound in openrlhf.models.actor (the experience forward).

    Without gradients (the experience forward) it is `chunked_entropy`; when the entropy is
    differentiated (upstream's entropy loss, --actor.entropy_coef) it is upstream's own.
    Upstream's Actor.forward keeps doing the rest: temperature scaling before, and the packing
    / ring-attention gather after.
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return _upstream_compute_entropy(logits)
    return chunked_entropy(logits)


@contextlib.contextmanager
def call_inputs(module: torch.nn.Module, **inputs):
    """While active, every call of `module` also receives these keyword inputs (a forward pre-hook).

    For upstream call sites with a fixed argument list: the actor trainer hands its loss the
    micro-batch's segment ends, the critic its images. The module stays the real one (no stand-in)."""
    if not inputs:
        yield module
        return

    def add_inputs(_module, args, kwargs):
        return args, {**kwargs, **inputs}

    handle = module.register_forward_pre_hook(add_inputs, with_kwargs=True)
    try:
        yield module
    finally:
        handle.remove()
