#!/usr/bin/env python
"""One script for a GPU machine that has only torch and transformers (no OpenRLHF, DeepSpeed or pytest).

    python tools/gpu_check.py                 # on the GPU machine, from the repository root
    python tools/gpu_check.py --device cpu    # the same checks on CPU (how the tests run it)

1. CUDA against CPU: every function of `openrlhf_sapo.algo` on random batches (non-contiguous masks,
   every segmenter, losses with their gradients) gives on the device what it gives on CPU: bool
   outputs exactly, floats to 1e-5.
2. Determinism: the segment ops (scatter / gather / cumsum on the device) under
   `torch.use_deterministic_algorithms(True)`: none raises, and two runs are bitwise equal.
3. Timings: the op timings of `make bench` (B=256, T=2048 by default) for SAPO's ops on the device,
   median of repeats. (The upstream baselines of `make bench` need OpenRLHF, absent on that machine;
   the JSON keeps the absolute times for a side-by-side run elsewhere.)
Prints a markdown summary and JSON (also to --json); exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from openrlhf_sapo.algo import (  # noqa: E402
    entropy_segment_ends,
    fixed_segment_ends,
    lowprob_segment_ends,
    masked_whiten,
    naive_is_policy_loss,
    newline_segment_ends,
    sapo_policy_loss,
    sapo_value_loss,
    segment_gae,
    segment_mean,
    segment_statistics,
)


def random_batch(seed: int, device: str) -> dict:
    """B in 1..8, T in 1..64; every third seed a non-contiguous mask."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, T = rng.randint(1, 8), rng.randint(1, 64)
    if seed % 3:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None] < lengths[:, None]
    else:
        mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    batch = {"mask": mask, "token_ids": torch.randint(0, 50, (B, T), generator=g),
             "newline_table": torch.rand(50, generator=g) < 0.1}
    for key in ("entropy", "values", "old_values", "returns", "advantages", "rewards"):
        batch[key] = torch.randn(B, T, generator=g)
    batch["entropy"] = batch["entropy"].abs()
    batch["old_log_probs"] = -torch.rand(B, T, generator=g) * 3
    batch["log_probs"] = batch["old_log_probs"] + 0.1 * torch.randn(B, T, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def algo_outputs(b: dict) -> dict:
    """Every public op on one batch (the policy loss with its gradient)."""
    mask = b["mask"]
    ends = entropy_segment_ends(b["entropy"], mask, 30.0)
    log_probs = b["log_probs"].detach().clone().requires_grad_(True)
    policy = sapo_policy_loss(log_probs, b["old_log_probs"], b["advantages"], mask, ends, dual_clip=3.0)
    (grad,) = torch.autograd.grad(policy, log_probs)
    advantages, returns = segment_gae(b["rewards"], b["values"], mask, ends, 1.0, 0.99)
    out = {
        "entropy_ends": ends,
        "fixed_ends": fixed_segment_ends(mask, 3),
        "lowprob_ends": lowprob_segment_ends(b["old_log_probs"], mask, 0.5, 2),
        "newline_ends": newline_segment_ends(b["token_ids"], mask, b["newline_table"]),
        "advantages": advantages,
        "returns": returns,
        "advantages_start": segment_gae(b["rewards"], b["values"], mask, ends, 1.0, 0.99, "start")[0],
        "segment_mean": segment_mean(b["log_probs"], mask, ends),
        "whiten": masked_whiten(b["advantages"], mask, clamp=5.0),
        "policy_loss": policy.detach(),
        "policy_grad": grad,
        "naive_is_loss": naive_is_policy_loss(b["log_probs"], b["old_log_probs"], b["advantages"], mask, ends),
        "value_loss": sapo_value_loss(b["values"], b["old_values"], b["returns"], mask, ends),
    }
    out.update({f"stats/{k}": v for k, v in segment_statistics(mask, ends, b["entropy"]).items()})
    return out


def compare(device: str, seeds: int) -> list:
    """Mismatches of `device` against CPU, as readable strings."""
    problems = []
    for seed in range(seeds):
        cpu, dev = algo_outputs(random_batch(seed, "cpu")), algo_outputs(random_batch(seed, device))
        for key, expected in cpu.items():
            got = dev[key]
            if got.device.type != torch.device(device).type:
                problems.append(f"seed {seed} {key}: computed on {got.device}, not {device}")
                continue
            got = got.cpu()
            if expected.dtype == torch.bool:
                ok = torch.equal(got, expected)
            else:
                ok = got.dtype == expected.dtype and torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
            if not ok:
                problems.append(f"seed {seed} {key}: max difference "
                                f"{(got.double() - expected.double()).abs().max().item():.3g}")
    return problems


def determinism(device: str) -> list:
    problems = []
    torch.use_deterministic_algorithms(True)
    try:
        for seed in range(4):
            try:
                first, second = algo_outputs(random_batch(seed, device)), algo_outputs(random_batch(seed, device))
            except RuntimeError as err:  # an op without a deterministic implementation
                problems.append(f"seed {seed}: {str(err).splitlines()[0]}")
                continue
            problems += [f"seed {seed} {k}: two runs differ" for k in first if not torch.equal(first[k], second[k])]
    finally:
        torch.use_deterministic_algorithms(False)
    return problems


def timings(device: str, B: int, T: int, repeats: int) -> dict:
    from openrlhf_sapo.bench import make_batch, median_seconds

    b = make_batch(B, T, device)
    mask = b["mask"]
    ends = entropy_segment_ends(b["entropy"], mask, 30.0)

    def policy():
        log_probs = b["log_probs"].detach().requires_grad_()
        sapo_policy_loss(log_probs, b["old_log_probs"], b["advantages"], mask, ends).backward()

    def value():
        values = b["values"].detach().requires_grad_()
        sapo_value_loss(values, b["values"].detach(), b["returns"], mask, ends).backward()

    cases = {
        "entropy segmentation": lambda: entropy_segment_ends(b["entropy"], mask, 30.0),
        "segment_gae": lambda: segment_gae(b["rewards"], b["values"], mask, ends),
        "sapo_policy_loss fwd+bwd": policy,
        "sapo_value_loss fwd+bwd": value,
        "masked_whiten": lambda: masked_whiten(b["advantages"], mask, clamp=5.0),
    }
    return {name: 1e3 * median_seconds(fn, device, repeats) for name, fn in cases.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--seeds", type=int, default=24)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu, or on a GPU machine", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    result = {"device": name, "torch": torch.__version__,
              "cuda_vs_cpu": compare(args.device, args.seeds), "deterministic": determinism(args.device),
              "timings_ms": timings(args.device, args.batch, args.length, args.repeats)}
    print(f"## openrlhf_sapo.algo on {name} (torch {torch.__version__})\n")
    print(f"- {args.device} vs CPU, {args.seeds} random batches: "
          + ("all equal" if not result["cuda_vs_cpu"] else f"{len(result['cuda_vs_cpu'])} MISMATCHES"))
    print("- deterministic algorithms: " + ("ok, bitwise repeatable" if not result["deterministic"] else "FAILED"))
    print(f"\n| op (B={args.batch}, T={args.length}) | ms (median of {args.repeats}) |\n|---|---:|")
    for op, ms in result["timings_ms"].items():
        print(f"| {op} | {ms:.3f} |")
    for problem in result["cuda_vs_cpu"] + result["deterministic"]:
        print("  " + problem)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["cuda_vs_cpu"] or result["deterministic"] else 0


if __name__ == "__main__":
    sys.exit(main())
