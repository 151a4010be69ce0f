"""`python -m openrlhf_sapo.bench` (`make bench`): SAPO's segment ops against OpenRLHF's token ops.

One process, one random batch, side by side; prints a table and JSON. Ratios are
SAPO time / upstream time (median of repeats), so they hold on any machine; the targets are
those of the issue that introduced the algorithm core:
  - entropy segmentation + segment_gae  vs  RemoteExperienceMaker.get_advantages_and_returns: <= 1.0
  - sapo_policy_loss fwd+bwd            vs  PolicyLoss fwd+bwd: <= 1.5
  - sapo_value_loss fwd+bwd             vs  ValueLoss fwd+bwd:  <= 1.5
and peak extra memory, as a multiple of one [B, T] fp32 tensor.

Also measured, with no target: the rollout-entropy pass SAPO adds to the experience forward
(`policy_entropy`, and the entropy segmenter's input) against the log-prob pass upstream always
does, on bf16 logits of --entropy_tokens tokens over a --vocab vocabulary (Qwen2.5's by default).
PPO and GRPO skip the pass unless --logger.policy_entropy is set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict

import torch

from .algo import entropy_segment_ends, sapo_policy_loss, sapo_value_loss, segment_gae
from .upstream import upstream

TARGETS = {"advantages": 1.0, "policy_loss": 1.5, "value_loss": 1.5}


def make_batch(B: int, T: int, device: str, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Responses of random length in [T/2, T], KL-like token rewards plus an outcome at EOS."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    rewards = -0.001 * torch.rand(B, T, generator=g)
    rewards[torch.arange(B), lengths - 1] += torch.randint(0, 2, (B,), generator=g).float()
    old_log_probs = -torch.rand(B, T, generator=g) * 3
    batch = {
        "mask": mask,
        "rewards": rewards * mask,
        "values": torch.randn(B, T, generator=g),
        "entropy": torch.rand(B, T, generator=g) * 4,
        "old_log_probs": old_log_probs,
        "log_probs": old_log_probs + 0.05 * torch.randn(B, T, generator=g),
        "advantages": torch.randn(B, T, generator=g),
        "returns": torch.randn(B, T, generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated by fn above what was live before it (inputs excluded)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: replay the profiler's allocation timeline (every alloc/free with its size).
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def build_cases(batch: Dict[str, torch.Tensor], topk_percent: float):
    PolicyLoss = upstream("openrlhf.models.loss", "PolicyLoss")
    ValueLoss = upstream("openrlhf.models.loss", "ValueLoss")
    RemoteExperienceMaker = upstream("openrlhf.trainer.ppo_utils.experience_maker", "RemoteExperienceMaker")
    mask, maskf = batch["mask"], batch["mask"].float()
    ends = entropy_segment_ends(batch["entropy"], mask, topk_percent)
    policy_loss = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=3.0)
    value_loss = ValueLoss(clip_eps=0.5)

    def sapo_advantages():
        segment_gae(batch["rewards"], batch["values"], mask, entropy_segment_ends(batch["entropy"], mask, topk_percent))

    def upstream_advantages():
        RemoteExperienceMaker.get_advantages_and_returns(None, batch["values"], batch["rewards"], maskf, 1.0, 0.99)

    def backward(loss_fn):
        def run():
            log_probs = batch["log_probs"].detach().requires_grad_()
            loss_fn(log_probs).backward()

        return run

    def value_backward(loss_fn):
        def run():
            values = batch["values"].detach().requires_grad_()
            loss_fn(values).backward()

        return run

    return {
        "advantages": (
            sapo_advantages,
            upstream_advantages,
            "entropy segmentation + segment_gae vs RemoteExperienceMaker.get_advantages_and_returns",
        ),
        "policy_loss": (
            backward(lambda lp: sapo_policy_loss(lp, batch["old_log_probs"], batch["advantages"], mask, ends)),
            backward(lambda lp: policy_loss(lp, batch["old_log_probs"], batch["advantages"], action_mask=maskf)[0]),
            "sapo_policy_loss fwd+bwd vs PolicyLoss fwd+bwd",
        ),
        "value_loss": (
            value_backward(lambda v: sapo_value_loss(v, batch["values"], batch["returns"], mask, ends)),
            value_backward(lambda v: value_loss(v, batch["values"], batch["returns"], action_mask=maskf)),
            "sapo_value_loss fwd+bwd vs ValueLoss fwd+bwd",
        ),
    }


def entropy_pass(tokens: int, vocab: int, device: str, repeats: int) -> dict:
    """The experience forward's extra entropy pass vs its log-prob pass, on the same bf16 logits."""
    from .models.utils import chunked_entropy

    log_probs_from_logits = upstream("openrlhf.models.utils", "log_probs_from_logits")
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(1, tokens, vocab, generator=g)).to(device=device, dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (1, tokens), generator=g).to(device)
    t_entropy = median_seconds(lambda: chunked_entropy(logits), device, repeats)
    t_log_probs = median_seconds(lambda: log_probs_from_logits(logits, labels), device, repeats)
    return {"tokens": tokens, "vocab": vocab, "entropy_ms": 1e3 * t_entropy, "log_probs_ms": 1e3 * t_log_probs,
            "ratio": t_entropy / t_log_probs}


def run(B: int, T: int, topk_percent: float, device: str, repeats: int,
        entropy_tokens: int = 1024, vocab: int = 151936) -> dict:
    batch = make_batch(B, T, device)
    one_tensor = B * T * 4
    results = {
        "config": {
            "B": B,
            "T": T,
            "topk_percent": topk_percent,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch_threads": torch.get_num_threads(),
            "repeats": repeats,
            "torch": torch.__version__,
        },
        "cases": {},
    }
    for name, (ours, theirs, what) in build_cases(batch, topk_percent).items():
        t_ours = median_seconds(ours, device, repeats)
        t_theirs = median_seconds(theirs, device, repeats)
        results["cases"][name] = {
            "what": what,
            "sapo_ms": 1e3 * t_ours,
            "upstream_ms": 1e3 * t_theirs,
            "ratio": t_ours / t_theirs,
            "target_ratio": TARGETS[name],
            "meets_target": t_ours / t_theirs <= TARGETS[name],
            "sapo_peak_memory_x_BT": peak_extra_bytes(ours, device) / one_tensor,
            "upstream_peak_memory_x_BT": peak_extra_bytes(theirs, device) / one_tensor,
        }
    if entropy_tokens > 0:
        results["entropy_pass"] = entropy_pass(entropy_tokens, vocab, device, max(1, repeats // 2))
    return results


def format_table(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"SAPO segment ops vs OpenRLHF token ops: B={cfg['B']} T={cfg['T']} top-{cfg['topk_percent']}% "
        f"on {cfg['device']} ({cfg['torch_threads']} threads, median of {cfg['repeats']})",
        "",
        "| case | SAPO ms | upstream ms | ratio | target | peak mem SAPO (x [B,T] fp32) | peak mem upstream |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in results["cases"].items():
        mark = "ok" if c["meets_target"] else "MISSED"
        lines.append(
            f"| {name} | {c['sapo_ms']:.2f} | {c['upstream_ms']:.2f} | {c['ratio']:.2f} | <= {c['target_ratio']} {mark} "
            f"| {c['sapo_peak_memory_x_BT']:.1f} | {c['upstream_peak_memory_x_BT']:.1f} |"
        )
    entropy = results.get("entropy_pass")
    if entropy:
        lines += ["", f"Rollout entropy pass (SAPO; PPO/GRPO only with --logger.policy_entropy), bf16 logits of "
                  f"{entropy['tokens']} tokens x {entropy['vocab']} vocab: {entropy['entropy_ms']:.1f} ms vs the log-prob "
                  f"pass's {entropy['log_probs_ms']:.1f} ms (ratio {entropy['ratio']:.2f}; no target: the model forward "
                  "before both is the experience forward's main cost)"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256, help="responses per batch (B)")
    parser.add_argument("--length", type=int, default=2048, help="response length (T)")
    parser.add_argument("--topk_percent", type=float, default=30.0, help="share of tokens that end a segment")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--entropy_tokens", type=int, default=1024,
                        help="tokens of logits for the entropy-pass measurement (0 skips it)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary of those logits (Qwen2.5's)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    results = run(args.batch, args.length, args.topk_percent, args.device, args.repeats, args.entropy_tokens, args.vocab)
    print(format_table(results))
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
