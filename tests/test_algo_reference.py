"""`openrlhf_sapo.algo` against the naive loop reference in `tests/reference_sapo.py` (SAPO_SPEC.md §1-4).

- random batches (contiguous OpenRLHF layout and non-contiguous masks, garbage on padding) agree
  with the reference for every public function, values and gradients;
- property tests: permuting rows permutes outputs, extra padding columns change nothing, the
  entropy segmenter picks exactly k ends (+ the last valid token);
- empty responses contribute nothing and never produce NaN; bf16 and CUDA agree with fp32 CPU.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrlhf_sapo.algo import (
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
)
from tests.reference_sapo import (
    ref_entropy_segment_ends,
    ref_fixed_segment_ends,
    ref_lowprob_segment_ends,
    ref_masked_whiten,
    ref_newline_segment_ends,
    ref_sapo_policy_loss,
    ref_sapo_value_loss,
    ref_segment_gae,
    ref_segment_mean,
    topk_count,
)

SEEDS = range(50)
TOPK_PERCENTS = [12.5, 30.0, 33.3, 100.0, 28.0, 56.0, 60.0, 10.0, 50.0, 1.0, 70.0]
# Values written at invalid positions: large enough that any leak (x * mask, x**2 in fp32) shows.
GARBAGE = [1e30, -1e30, 3e4, -1e4, 7.0, -2.5]
ATOL = RTOL = 1e-5
FLOAT_INPUTS = [
    "entropy", "lowprob_log_probs", "log_probs", "old_log_probs", "advantages",
    "rewards", "values", "old_values", "returns",
]


# ---------------------------------------------------------------------------------------- batches
def _random_mask(rng: random.Random, B: int, T: int, contiguous: bool) -> torch.Tensor:
    """OpenRLHF layout (a valid run from t=0, lengths incl. 0, 1 and T) or an arbitrary 0/1 pattern."""
    rows = []
    for _ in range(B):
        if contiguous:
            n = rng.choice([0, 1, T, rng.randint(0, T), rng.randint(0, T)])
            rows.append([t < n for t in range(T)])
        else:
            density = rng.choice([0.0, 0.3, 0.7, 1.0, rng.random()])
            rows.append([rng.random() < density for _ in range(T)])
    return torch.tensor(rows, dtype=torch.bool).reshape(B, T)


def _garbage(rng: random.Random, shape) -> torch.Tensor:
    B, T = shape
    return torch.tensor([[rng.choice(GARBAGE) for _ in range(T)] for _ in range(B)], dtype=torch.float32).reshape(B, T)


def make_batch(mask: torch.Tensor, seed: int, strided: bool = False, mask_dtype=None) -> dict:
    """Every input of the public API for one random batch, with garbage on padding, plus random options."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape

    def on_valid(x):
        return torch.where(mask, x.float(), _garbage(rng, (B, T)))

    tie_mode = rng.choice(["continuous", "one_decimal", "small_int"])
    entropy = torch.rand(B, T, generator=g) * 3
    if tie_mode == "one_decimal":
        entropy = (entropy * 10).round() / 10
    elif tie_mode == "small_int":
        entropy = torch.randint(0, 3, (B, T), generator=g).float()

    log_probs = -torch.rand(B, T, generator=g) * 3
    spread = rng.choice([0.05, 0.3, 1.0])
    old_log_probs = log_probs + torch.randn(B, T, generator=g) * spread
    # a few tokens far outside the [-20, 20] log-ratio clamp
    far = torch.rand(B, T, generator=g) < 0.05
    old_log_probs = torch.where(far, log_probs + 25 * torch.sign(torch.randn(B, T, generator=g)), old_log_probs)

    values = torch.randn(B, T, generator=g)
    vocab = rng.randint(2, 50)
    ends_density = rng.choice([0.0, 0.2, 0.5, 1.0])
    segment_ends = (torch.rand(B, T, generator=g) < ends_density) & mask

    batch = dict(
        mask=mask,
        entropy=on_valid(entropy),
        lowprob_log_probs=on_valid(torch.rand(B, T, generator=g).clamp_min(1e-6).log()),
        log_probs=on_valid(log_probs),
        old_log_probs=on_valid(old_log_probs),
        advantages=on_valid(torch.randn(B, T, generator=g) * rng.choice([0.5, 2.0])),
        rewards=on_valid(torch.randn(B, T, generator=g)),
        values=on_valid(values),
        old_values=on_valid(values + torch.randn(B, T, generator=g) * rng.choice([0.1, 1.0])),
        returns=on_valid(torch.randn(B, T, generator=g)),
        token_ids=torch.randint(0, vocab, (B, T), generator=g),
        segment_ends=segment_ends,
        newline_table=torch.rand(vocab, generator=g) < rng.choice([0.1, 0.3, 0.8]),
        opts=dict(
            topk_percent=rng.choice(TOPK_PERCENTS),
            length=rng.randint(1, 6),
            threshold=rng.choice([0.05, 0.3, 0.6, 0.9]),
            every_k=rng.randint(1, 4),
            gamma=rng.choice([1.0, 0.0, rng.random()]),
            lambd=rng.choice([1.0, 0.0, 0.99, rng.random()]),
            value_at=rng.choice(["end", "start"]),
            clip_eps_low=rng.choice([0.2, 0.1]),
            clip_eps_high=rng.choice([0.28, 0.5]),
            dual_clip=rng.choice([3.0, 1.5, None]),
            value_clip=rng.choice([0.5, 0.1, None]),
            eps=rng.choice([1e-8, 1e-2]),
            clamp=rng.choice([None, 5.0, 0.5]),
        ),
    )
    if mask_dtype is not None:
        batch["mask"] = mask.to(mask_dtype)
    if strided:  # same values, non-contiguous memory (column-major)
        for key, val in batch.items():
            if isinstance(val, torch.Tensor) and val.dim() == 2:
                batch[key] = val.t().contiguous().t()
    return batch


def random_batch(seed: int, min_valid: int = 0) -> dict:
    """Random B in 1..6, T in 1..40; a third of the seeds use non-contiguous masks, some strided memory."""
    rng = random.Random(10_000 + seed)
    B, T = rng.randint(1, 6), rng.randint(1, 40)
    mask = _random_mask(rng, B, T, contiguous=seed % 3 != 0)
    if int(mask.sum()) < min_valid:
        B = max(B, 2)
        mask = torch.ones(B, T, dtype=torch.bool)
    mask_dtype = [torch.bool, torch.long, torch.float32][seed % 3] if seed % 2 else None
    return make_batch(mask, seed, strided=seed % 5 == 0, mask_dtype=mask_dtype)


def as_tensor(ref, dtype=torch.float64) -> torch.Tensor:
    """Nested-list reference output -> tensor (0-d tensors allowed as elements)."""
    return torch.tensor([[float(v) for v in row] for row in ref], dtype=dtype).reshape(len(ref), -1)


def assert_close(got: torch.Tensor, expected, atol=ATOL, rtol=RTOL):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert got.dtype == torch.float32, got.dtype
    assert torch.isfinite(got).all(), got
    torch.testing.assert_close(got.double(), expected.reshape(got.shape), atol=atol, rtol=rtol)


def assert_ends_equal(got: torch.Tensor, ref):
    assert got.dtype == torch.bool, got.dtype
    expected = torch.tensor(ref, dtype=torch.bool).reshape(got.shape)
    assert torch.equal(got, expected), f"\ngot\n{got.int()}\nexpected\n{expected.int()}"


# --------------------------------------------------------------------------- API calls, one place
def call_all(b: dict) -> dict:
    """Every public function on one batch; per-token outputs are [B, T], losses 0-d."""
    o = b["opts"]
    ends = b["segment_ends"]
    adv, ret = segment_gae(
        b["rewards"], b["values"], b["mask"], ends, gamma=o["gamma"], lambd=o["lambd"], value_at=o["value_at"]
    )
    pol = dict(clip_eps_low=o["clip_eps_low"], clip_eps_high=o["clip_eps_high"], dual_clip=o["dual_clip"])
    return dict(
        entropy_ends=entropy_segment_ends(b["entropy"], b["mask"], topk_percent=o["topk_percent"]),
        fixed_ends=fixed_segment_ends(b["mask"], o["length"]),
        lowprob_ends=lowprob_segment_ends(b["lowprob_log_probs"], b["mask"], o["threshold"], o["every_k"]),
        newline_ends=newline_segment_ends(b["token_ids"], b["mask"], b["newline_table"]),
        advantages=adv,
        returns=ret,
        segment_mean=segment_mean(b["log_probs"], b["mask"], ends),
        whiten=masked_whiten(b["advantages"], b["mask"], eps=o["eps"], clamp=o["clamp"]),
        policy_loss=sapo_policy_loss(
            b["log_probs"], b["old_log_probs"], b["advantages"], b["mask"], ends, ratio="segment", **pol
        ),
        token_policy_loss=sapo_policy_loss(
            b["log_probs"], b["old_log_probs"], b["advantages"], b["mask"], ends, ratio="token", **pol
        ),
        naive_is_loss=naive_is_policy_loss(b["log_probs"], b["old_log_probs"], b["advantages"], b["mask"], ends, **pol),
        value_loss=sapo_value_loss(
            b["values"], b["old_values"], b["returns"], b["mask"], ends,
            clip_eps=o["value_clip"], value_at=o["value_at"],
        ),
    )


PER_TOKEN = [
    "entropy_ends", "fixed_ends", "lowprob_ends", "newline_ends", "advantages", "returns", "segment_mean", "whiten"
]
SCALARS = ["policy_loss", "token_policy_loss", "naive_is_loss", "value_loss"]


# =============================================================== 1. agreement with the reference
def test_hand_computed_example():
    """A worked example (checks the reference itself too): segments {0, 1}, {2} of a 3-token response."""
    mask = torch.tensor([[True, True, True, False]])
    ends = torch.tensor([[False, True, False, True]])  # the end on padding is ignored; t=2 closes the last one
    rewards = torch.tensor([[1.0, 2.0, 3.0, 99.0]])
    values = torch.tensor([[0.5, 0.1, 0.2, 99.0]])
    # value_at=end: r = (3, 3), V = (0.1, 0.2); delta2 = 3 - 0.2 = 2.8; delta1 = 3 + 0.2 - 0.1 = 3.1; A1 = 3.1 + 0.5*2.8
    # value_at=start: V = (0.5, 0.2); delta2 = 2.8; delta1 = 3 + 0.2 - 0.5 = 2.7; A1 = 2.7 + 0.5*2.8
    for value_at, a1, v1 in (("end", 4.5, 0.1), ("start", 4.1, 0.5)):
        expected_adv = [[a1, a1, 2.8, 0.0]]
        expected_ret = [[a1 + v1, a1 + v1, 3.0, 0.0]]
        ref = ref_segment_gae(rewards, values, mask, ends, 1.0, 0.5, value_at)
        adv, ret = segment_gae(rewards, values, mask, ends, gamma=1.0, lambd=0.5, value_at=value_at)
        for got in (adv, as_tensor(ref[0]).float()):
            assert_close(got, expected_adv)
        for got in (ret, as_tensor(ref[1]).float()):
            assert_close(got, expected_ret)

    # log-ratios 0.2, 0.0 | 2.0: s = e^0.1 (inside the clip) for A = +1, s = e^2 for A = -1 -> dual clip 3
    old = torch.tensor([[-1.0, -1.0, -3.0, 0.0]])
    log_probs = old + torch.tensor([[0.2, 0.0, 2.0, 50.0]])
    advantages = torch.tensor([[1.0, 1.0, -1.0, 7.0]])
    expected = (-2 * math.exp(0.1) + 3.0) / 3
    assert_close(sapo_policy_loss(log_probs, old, advantages, mask, ends), expected)
    assert math.isclose(ref_sapo_policy_loss(log_probs, old, advantages, mask, ends), expected, rel_tol=1e-6)
    assert_close(segment_mean(log_probs - old, mask, ends), [[0.1, 0.1, 2.0, 0.0]], atol=1e-6)

    # value loss: reads at t=1, t=2 (end) or t=0, t=2 (start); t=2 is clipped to 0.5 by clip_eps = 0.5
    v = torch.tensor([[0.2, 0.1, 0.9, 5.0]])
    v_old = torch.zeros(1, 4)
    returns = torch.tensor([[1.0, 1.0, 1.0, 5.0]])
    for value_at, expected in (("end", (0.405 + 0.125) / 2), ("start", (0.32 + 0.125) / 2)):
        assert_close(sapo_value_loss(v, v_old, returns, mask, ends, clip_eps=0.5, value_at=value_at), expected)
        ref = ref_sapo_value_loss(v, v_old, returns, mask, ends, clip_eps=0.5, value_at=value_at)
        assert math.isclose(ref, expected, rel_tol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_segment_ends_matches_reference(seed):
    """Top-k entropy ends (k exact, ties lowest index first) + last valid token, nothing on padding."""
    b = random_batch(seed)
    for p in (b["opts"]["topk_percent"], 30.0, 12.5, 33.3, 100.0):
        got = entropy_segment_ends(b["entropy"], b["mask"], topk_percent=p)
        assert_ends_equal(got, ref_entropy_segment_ends(b["entropy"], b["mask"], p))


@pytest.mark.parametrize(
    "n,p,k",
    [(10, 30, 3), (7, 30, 3), (20, 30, 6), (1, 30, 1), (8, 12.5, 1), (9, 12.5, 2), (3, 33.3, 1), (10, 33.3, 4),
     (25, 28, 7), (25, 56, 14), (25, 60, 15), (30, 70, 21), (40, 100, 40), (5, 1, 1)],
)
def test_entropy_k_is_exact(n, p, k):
    """k = max(ceil(n*p/100), 1) exactly: decreasing entropy puts ends on 0..k-1 plus the last token n-1."""
    assert topk_count(n, p) == k
    T = n + 3
    mask = torch.arange(T).unsqueeze(0) < n
    entropy = torch.where(mask, torch.linspace(5.0, 1.0, T).unsqueeze(0), torch.full((1, T), 1e9))
    got = entropy_segment_ends(entropy, mask, topk_percent=p)
    expected = torch.zeros(1, T, dtype=torch.bool)
    expected[0, :k] = True
    expected[0, n - 1] = True
    assert torch.equal(got, expected), (got.int(), expected.int())


def test_entropy_ties_lowest_index_first():
    """All-equal entropy: the first k valid tokens win; with a gap in the mask the gap is skipped."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    entropy = torch.where(mask, torch.full(mask.shape, 2.0), torch.full(mask.shape, 9.0))
    got = entropy_segment_ends(entropy, mask, topk_percent=30.0)
    expected = torch.zeros_like(mask)
    expected[0, [0, 1, 2, 9]] = True
    expected[1, [1, 3, 4, 11]] = True  # n = 10 -> k = 3: valid tokens 1, 3, 4; plus the last valid token
    assert torch.equal(got, expected), got.int()


@pytest.mark.parametrize("seed", SEEDS)
def test_fixed_segment_ends_matches_reference(seed):
    """Every length-th valid token + the last valid token."""
    b = random_batch(seed)
    for length in (b["opts"]["length"], 1, 3, 64):
        assert_ends_equal(fixed_segment_ends(b["mask"], length), ref_fixed_segment_ends(b["mask"], length))


@pytest.mark.parametrize("seed", SEEDS)
def test_lowprob_segment_ends_matches_reference(seed):
    """Every every_k-th low-probability valid token + the last valid token."""
    b = random_batch(seed)
    for threshold, every_k in ((b["opts"]["threshold"], b["opts"]["every_k"]), (0.5, 1), (0.9, 3), (1e-9, 1)):
        got = lowprob_segment_ends(b["lowprob_log_probs"], b["mask"], threshold, every_k)
        assert_ends_equal(got, ref_lowprob_segment_ends(b["lowprob_log_probs"], b["mask"], threshold, every_k))


@pytest.mark.parametrize("seed", SEEDS)
def test_newline_segment_ends_matches_reference(seed):
    """Valid newline tokens close a segment, + the last valid token."""
    b = random_batch(seed)
    got = newline_segment_ends(b["token_ids"], b["mask"], b["newline_table"])
    assert_ends_equal(got, ref_newline_segment_ends(b["token_ids"], b["mask"], b["newline_table"]))


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_gae_matches_reference(seed):
    """Segment GAE (both value_at, random gamma/lambda) with random and entropy-based segment ends."""
    b = random_batch(seed)
    o = b["opts"]
    entropy_ends = entropy_segment_ends(b["entropy"], b["mask"], topk_percent=o["topk_percent"])
    for ends in (b["segment_ends"], entropy_ends):
        for value_at in ("end", "start"):
            adv, ret = segment_gae(
                b["rewards"], b["values"], b["mask"], ends, gamma=o["gamma"], lambd=o["lambd"], value_at=value_at
            )
            ref_adv, ref_ret = ref_segment_gae(
                b["rewards"], b["values"], b["mask"], ends, o["gamma"], o["lambd"], value_at
            )
            assert_close(adv, as_tensor(ref_adv))
            assert_close(ret, as_tensor(ref_ret))


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_gae_defaults_match_reference(seed):
    """Defaults are gamma = 1.0, lambda = 0.99, value_at = 'end'."""
    b = random_batch(seed)
    adv, ret = segment_gae(b["rewards"], b["values"], b["mask"], b["segment_ends"])
    ref_adv, ref_ret = ref_segment_gae(b["rewards"], b["values"], b["mask"], b["segment_ends"], 1.0, 0.99, "end")
    assert_close(adv, as_tensor(ref_adv))
    assert_close(ret, as_tensor(ref_ret))


@pytest.mark.parametrize("seed", SEEDS)
def test_segment_mean_matches_reference(seed):
    """Per-token mean over the token's segment, 0 on padding."""
    b = random_batch(seed)
    got = segment_mean(b["log_probs"], b["mask"], b["segment_ends"])
    assert_close(got, as_tensor(ref_segment_mean(b["log_probs"], b["mask"], b["segment_ends"])))


@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_reference(seed):
    """Segment-ratio and token-ratio (naive-IS) surrogates, random clip / dual-clip settings, and defaults."""
    b = random_batch(seed)
    o = b["opts"]
    args = (b["log_probs"], b["old_log_probs"], b["advantages"], b["mask"], b["segment_ends"])
    kw = dict(clip_eps_low=o["clip_eps_low"], clip_eps_high=o["clip_eps_high"], dual_clip=o["dual_clip"])
    for ratio in ("segment", "token"):
        got = sapo_policy_loss(*args, ratio=ratio, **kw)
        assert got.dim() == 0
        assert_close(got, ref_sapo_policy_loss(*args, ratio=ratio, **kw))
    assert_close(naive_is_policy_loss(*args, **kw), ref_sapo_policy_loss(*args, ratio="token", **kw))
    naive, token = naive_is_policy_loss(*args, **kw), sapo_policy_loss(*args, ratio="token", **kw)
    torch.testing.assert_close(naive, token, atol=0, rtol=1e-6)
    assert_close(sapo_policy_loss(*args), ref_sapo_policy_loss(*args))  # 0.2 / 0.28 / 3.0 / segment


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_reference(seed):
    """Clipped (or unclipped) value loss averaged over segment ends / starts."""
    b = random_batch(seed)
    args = (b["values"], b["old_values"], b["returns"], b["mask"], b["segment_ends"])
    for clip_eps in (b["opts"]["value_clip"], None, 0.5):
        for value_at in ("end", "start"):
            got = sapo_value_loss(*args, clip_eps=clip_eps, value_at=value_at)
            assert got.dim() == 0
            assert_close(got, ref_sapo_value_loss(*args, clip_eps=clip_eps, value_at=value_at))
    assert_close(sapo_value_loss(*args), ref_sapo_value_loss(*args))  # clip 0.5, value_at="end"


@pytest.mark.parametrize("seed", SEEDS)
def test_masked_whiten_matches_reference(seed):
    """Batch whitening over valid tokens with unbiased variance, optional clamp, 0 on padding."""
    b = random_batch(seed, min_valid=2)
    o = b["opts"]
    got = masked_whiten(b["advantages"], b["mask"], eps=o["eps"], clamp=o["clamp"])
    assert_close(got, as_tensor(ref_masked_whiten(b["advantages"], b["mask"], o["eps"], o["clamp"])))
    got = masked_whiten(b["advantages"], b["mask"])
    assert_close(got, as_tensor(ref_masked_whiten(b["advantages"], b["mask"])))


@pytest.mark.parametrize("seed", range(10))
def test_nan_and_inf_on_padding_are_never_read(seed):
    """Padding may hold anything (NaN, inf, set segment_ends): every output equals the clean-padding one."""
    b = random_batch(seed, min_valid=2)
    clean = call_all(b)
    dirty = dict(b)
    pick = torch.randint(0, 3, b["mask"].shape, generator=torch.Generator().manual_seed(seed))
    poison = torch.tensor([math.nan, math.inf, -math.inf])[pick]
    valid = b["mask"].bool()
    for key in FLOAT_INPUTS:
        dirty[key] = torch.where(valid, b[key], poison)
    dirty["segment_ends"] = b["segment_ends"] | ~valid
    got = call_all(dirty)
    for key in PER_TOKEN + SCALARS:
        if got[key].dtype == torch.bool:
            assert torch.equal(got[key], clean[key]), key
        else:
            assert torch.isfinite(got[key]).all(), key
            torch.testing.assert_close(got[key], clean[key], atol=1e-6, rtol=1e-6, msg=key)


@pytest.mark.parametrize("seed", range(10))
def test_nan_and_inf_on_padding_give_finite_gradients(seed):
    """Padding that holds NaN / inf must not turn the gradients (which reach the model) into NaN."""
    b = random_batch(seed, min_valid=2)
    valid = b["mask"].bool()
    pick = torch.randint(0, 3, valid.shape, generator=torch.Generator().manual_seed(seed))
    poison = torch.tensor([math.nan, math.inf, -math.inf])[pick]

    def grads(pad):
        d = {k: (torch.where(valid, b[k], pad) if k in FLOAT_INPUTS else b[k]) for k in b}
        lp = d["log_probs"].detach().clone().requires_grad_(True)
        v = d["values"].detach().clone().requires_grad_(True)
        ends = d["segment_ends"]
        out = []
        for ratio in ("segment", "token"):
            loss = sapo_policy_loss(lp, d["old_log_probs"], d["advantages"], d["mask"], ends, ratio=ratio)
            out.append(torch.autograd.grad(loss, lp)[0])
        out.append(torch.autograd.grad(segment_mean(lp, d["mask"], ends).sum(), lp)[0])
        vloss = sapo_value_loss(v, d["old_values"], d["returns"], d["mask"], ends)
        out.append(torch.autograd.grad(vloss, v)[0])
        return out

    names = ["policy_loss[segment]", "policy_loss[token]", "segment_mean", "value_loss"]
    for name, dirty, clean in zip(names, grads(poison), grads(torch.zeros(()))):
        assert torch.isfinite(dirty).all(), (name, dirty)
        torch.testing.assert_close(dirty, clean, atol=1e-6, rtol=1e-6, msg=name)


# ======================================================================================= 2. grads
def _reference_grad(fn, x: torch.Tensor, weights=None) -> torch.Tensor:
    """Gradient of the reference (float64 autograd through 0-d tensors) w.r.t. x."""
    x64 = x.detach().double().requires_grad_(True)
    out = fn(x64)
    if weights is not None:
        out = sum(w * v for w_row, v_row in zip(weights.tolist(), out) for w, v in zip(w_row, v_row))
    if isinstance(out, torch.Tensor) and out.requires_grad:
        out.backward()
    return x64.grad if x64.grad is not None else torch.zeros_like(x64)


@pytest.mark.parametrize("seed", range(15))
def test_segment_mean_gradient_matches_reference(seed):
    """d(sum w * segment_mean(x))/dx: each token gets the segment's mean weight / length; 0 on padding."""
    b = random_batch(seed)
    x = b["log_probs"].detach().clone().requires_grad_(True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    (segment_mean(x, b["mask"], b["segment_ends"]) * weights).sum().backward()
    expected = _reference_grad(lambda v: ref_segment_mean(v, b["mask"], b["segment_ends"]), x, weights)
    assert_close(x.grad, expected)


@pytest.mark.parametrize("ratio", ["segment", "token"])
@pytest.mark.parametrize("seed", range(15))
def test_policy_loss_gradient_matches_reference(seed, ratio):
    """d loss / d log_probs flows through the segment mean to every token of the segment."""
    b = random_batch(seed)
    o = b["opts"]
    kw = dict(clip_eps_low=o["clip_eps_low"], clip_eps_high=o["clip_eps_high"], dual_clip=o["dual_clip"], ratio=ratio)
    rest = (b["old_log_probs"], b["advantages"], b["mask"], b["segment_ends"])
    x = b["log_probs"].detach().clone().requires_grad_(True)
    sapo_policy_loss(x, *rest, **kw).backward()
    expected = _reference_grad(lambda v: ref_sapo_policy_loss(v, *rest, **kw), x)
    assert x.grad is not None
    assert_close(x.grad, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("seed", range(15))
def test_value_loss_gradient_matches_reference(seed):
    """d value loss / d values is nonzero only where the segment value is read."""
    b = random_batch(seed)
    o = b["opts"]
    rest = (b["old_values"], b["returns"], b["mask"], b["segment_ends"])
    kw = dict(clip_eps=o["value_clip"], value_at=o["value_at"])
    v = b["values"].detach().clone().requires_grad_(True)
    sapo_value_loss(v, *rest, **kw).backward()
    expected = _reference_grad(lambda u: ref_sapo_value_loss(u, *rest, **kw), v)
    assert v.grad is not None
    assert_close(v.grad, expected, atol=1e-5, rtol=1e-4)


# ============================================================================ 3. property tests
@st.composite
def batches(draw, max_b=5, max_t=24):
    """A random mask (contiguous or not, possibly empty rows) and a seed for the values."""
    B, T = draw(st.integers(1, max_b)), draw(st.integers(1, max_t))
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
        mask = torch.tensor([[t < n for t in range(T)] for n in lengths], dtype=torch.bool)
    else:
        bits = draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
        mask = torch.tensor(bits, dtype=torch.bool)
    return make_batch(mask.reshape(B, T), draw(st.integers(0, 2**31 - 1)))


PROPERTY_SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _compare(got: dict, expected: dict, index=None, tail=None):
    """Per-token outputs equal (after optional row permutation / on the first columns); losses equal."""
    for key in PER_TOKEN:
        g, e = got[key], expected[key]
        if index is not None:
            e = e[index]
        if tail is not None:
            new = g[:, tail:]
            assert not new.any(), (key, new)
            g = g[:, :tail]
        if g.dtype == torch.bool:
            assert torch.equal(g, e), key
        else:
            torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5, msg=key)
    for key in SCALARS:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


@PROPERTY_SETTINGS
@given(b=batches(), perm_seed=st.integers(0, 2**31 - 1))
def test_row_permutation_permutes_outputs(b, perm_seed):
    """Permuting responses permutes every per-token output and leaves every loss unchanged."""
    B = b["mask"].shape[0]
    perm = torch.randperm(B, generator=torch.Generator().manual_seed(perm_seed))
    permuted = {k: (v[perm] if isinstance(v, torch.Tensor) and v.dim() == 2 else v) for k, v in b.items()}
    _compare(call_all(permuted), call_all(b), index=perm)


@PROPERTY_SETTINGS
@given(b=batches(), extra=st.integers(1, 9), garbage_seed=st.integers(0, 2**31 - 1))
def test_extra_padding_columns_change_nothing(b, extra, garbage_seed):
    """Appending padding columns (garbage values, garbage segment ends) changes nothing; new columns are 0."""
    rng = random.Random(garbage_seed)
    B = b["mask"].shape[0]
    T = b["mask"].shape[1]
    padded = dict(b)
    for key, val in b.items():
        if not (isinstance(val, torch.Tensor) and val.dim() == 2):
            continue
        if val.dtype == torch.bool and key == "mask":
            pad = torch.zeros(B, extra, dtype=torch.bool)
        elif val.dtype == torch.bool:
            pad = torch.rand(B, extra) < 0.5
        elif key == "token_ids":
            pad = torch.randint(0, b["newline_table"].numel(), (B, extra))
        else:
            pad = _garbage(rng, (B, extra))
        padded[key] = torch.cat([val, pad], dim=1)
    _compare(call_all(padded), call_all(b), tail=T)


@PROPERTY_SETTINGS
@given(b=batches(max_b=4, max_t=40), p=st.one_of(st.sampled_from(TOPK_PERCENTS), st.floats(0.01, 100.0)))
def test_entropy_end_count_is_k_plus_last(b, p):
    """Per row: #ends == k, + 1 when the last valid token is not among the top k; ends outrank non-ends."""
    mask = b["mask"]
    ends = entropy_segment_ends(b["entropy"], mask, topk_percent=p)
    assert not (ends & ~mask).any()
    top_k_ranked = ref_entropy_segment_ends(b["entropy"], mask, p)
    for r in range(mask.shape[0]):
        valid = mask[r].nonzero().flatten().tolist()
        if not valid:
            assert not ends[r].any()
            continue
        k = topk_count(len(valid), p)
        ranked = sorted(valid, key=lambda t: (-float(b["entropy"][r, t]), t))
        last_extra = valid[-1] not in ranked[:k]
        assert int(ends[r].sum()) == k + int(last_extra), (r, k, ends[r].int())
        assert bool(ends[r, valid[-1]])
        chosen = [t for t in valid if ends[r, t] and t != valid[-1]]
        others = [t for t in valid if not ends[r, t]]
        if chosen and others:
            assert min(float(b["entropy"][r, t]) for t in chosen) >= max(float(b["entropy"][r, t]) for t in others)
        assert ends[r].tolist() == top_k_ranked[r]


# ========================================================================= 4. empty responses
@pytest.mark.parametrize("seed", range(10))
def test_empty_responses_contribute_nothing(seed):
    """Inserting responses with no valid token adds zero rows and leaves every loss unchanged."""
    b = random_batch(seed, min_valid=2)
    B, T = b["mask"].shape
    with_empty = dict(b)
    for key, val in b.items():
        if isinstance(val, torch.Tensor) and val.dim() == 2:
            if key == "mask":
                extra = torch.zeros(2, T, dtype=val.dtype)
            elif val.dtype == torch.bool:
                extra = torch.ones(2, T, dtype=torch.bool)
            elif key == "token_ids":
                extra = torch.zeros(2, T, dtype=val.dtype)
            else:
                extra = torch.full((2, T), 1e30)
            with_empty[key] = torch.cat([extra[:1], val, extra[1:]], dim=0)
    got, expected = call_all(with_empty), call_all(b)
    for key in PER_TOKEN:
        assert not got[key][0].any() and not got[key][-1].any(), key
        if got[key].dtype == torch.bool:
            assert torch.equal(got[key][1:-1], expected[key]), key
        else:
            assert torch.isfinite(got[key]).all(), key
            torch.testing.assert_close(got[key][1:-1], expected[key], atol=1e-6, rtol=1e-5, msg=key)
    for key in SCALARS:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (6, 40)])
def test_all_empty_batch(B, T):
    """No valid token anywhere: per-token outputs all 0/False, losses exactly 0, gradients finite (0)."""
    mask = torch.zeros(B, T, dtype=torch.bool)
    b = make_batch(mask, seed=B * 100 + T)
    for key in ("log_probs", "values"):
        b[key] = b[key].detach().clone().requires_grad_(True)
    out = call_all(b)
    for key in PER_TOKEN:
        assert out[key].shape == (B, T), key
        assert not out[key].any(), key
    for key in SCALARS:
        assert out[key].dim() == 0 and torch.isfinite(out[key]) and float(out[key].detach()) == 0.0, (key, out[key])
    (out["policy_loss"] + out["token_policy_loss"] + out["value_loss"] + out["segment_mean"].sum()).backward()
    for key in ("log_probs", "values"):
        grad = b[key].grad
        assert grad is None or (torch.isfinite(grad).all() and not grad.any()), (key, grad)


@pytest.mark.parametrize("ratio", ["segment", "token"])
def test_all_empty_batch_losses_are_differentiable(ratio):
    """A step whose batch has no valid token must still be able to call backward() on the losses."""
    mask = torch.zeros(2, 5, dtype=torch.bool)
    b = make_batch(mask, seed=3)
    lp = b["log_probs"].detach().clone().requires_grad_(True)
    v = b["values"].detach().clone().requires_grad_(True)
    loss = sapo_policy_loss(lp, b["old_log_probs"], b["advantages"], mask, b["segment_ends"], ratio=ratio)
    vloss = sapo_value_loss(v, b["old_values"], b["returns"], mask, b["segment_ends"])
    (g_lp,) = torch.autograd.grad(loss, lp, allow_unused=True)
    (g_v,) = torch.autograd.grad(vloss, v, allow_unused=True)
    for g in (g_lp, g_v):
        assert g is None or (torch.isfinite(g).all() and not g.any()), g


def test_whiten_single_valid_token_is_not_nan():
    """One valid token in the batch: unbiased variance is undefined; as documented, the variance is
    taken as 0, so the centred token is 0 (and without centring it is x / sqrt(eps)), never NaN."""
    mask = torch.tensor([[True, False, False], [False, False, False]])
    x = torch.tensor([[0.7, 1e30, -1e30], [3.0, 4.0, 5.0]])
    out = masked_whiten(x, mask)
    assert torch.equal(out, torch.zeros_like(out)), out
    scaled = masked_whiten(x, mask, shift_mean=False, eps=0.25)
    torch.testing.assert_close(scaled, torch.tensor([[0.7 / 0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))


# ===================================================================================== 5. dtypes


@pytest.mark.parametrize("seed", range(12))
def test_bf16_inputs_match_fp32(seed):
    """bf16 inputs: float outputs are float32 and match the fp32 computation on the same (rounded) values."""
    b = random_batch(seed, min_valid=2)
    bf16, rounded = dict(b), dict(b)
    for key in FLOAT_INPUTS:
        bf16[key] = b[key].to(torch.bfloat16)
        rounded[key] = bf16[key].float()
    got, expected = call_all(bf16), call_all(rounded)
    for key in PER_TOKEN + SCALARS:
        if expected[key].dtype == torch.bool:
            assert torch.equal(got[key], expected[key]), key
        else:
            assert got[key].dtype == torch.float32, (key, got[key].dtype)
            torch.testing.assert_close(got[key], expected[key], atol=1e-4, rtol=1e-4, msg=key)
    # and close to the fp32 results on the unrounded values where segmentation is held fixed
    full = call_all(b)
    for key in ("advantages", "returns", "segment_mean", "value_loss"):
        torch.testing.assert_close(got[key], full[key], atol=5e-2, rtol=2e-2, msg=key)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("seed", range(12))
def test_cuda_matches_cpu(seed):
    """Every function gives the same result on CUDA as on CPU (bool outputs exactly), gradients too."""
    b = random_batch(seed, min_valid=2)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}
    for src in (b, cuda):
        src["log_probs"] = src["log_probs"].detach().clone().requires_grad_(True)
    got, expected = call_all(cuda), call_all(b)
    for key in PER_TOKEN + SCALARS:
        assert got[key].device.type == "cuda", key
        g = got[key].detach().cpu()
        if g.dtype == torch.bool:
            assert torch.equal(g, expected[key]), key
        else:
            torch.testing.assert_close(g, expected[key].detach(), atol=1e-5, rtol=1e-5, msg=key)
    got["policy_loss"].backward()
    expected["policy_loss"].backward()
    torch.testing.assert_close(cuda["log_probs"].grad.cpu(), b["log_probs"].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(10))
def test_float64_inputs_are_computed_in_float64(seed):
    """As in torch's own ops, float64 stays float64 (computing it in float32 left errors of ~1e-7)."""
    b = random_batch(seed, min_valid=2)
    b = {k: (v.double() if k in FLOAT_INPUTS else v) for k, v in b.items()}
    o, mask, ends = b["opts"], b["mask"], b["segment_ends"]

    def close64(got, expected):
        assert got.dtype == torch.float64, got.dtype
        expected = torch.as_tensor(expected, dtype=torch.float64).reshape(got.shape)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)

    adv, ret = segment_gae(b["rewards"], b["values"], mask, ends, gamma=o["gamma"], lambd=o["lambd"])
    ref_adv, ref_ret = ref_segment_gae(b["rewards"], b["values"], mask, ends, o["gamma"], o["lambd"], "end")
    close64(adv, as_tensor(ref_adv))
    close64(ret, as_tensor(ref_ret))
    args = (b["log_probs"], b["old_log_probs"], b["advantages"], mask, ends)
    close64(sapo_policy_loss(*args), ref_sapo_policy_loss(*args))
    value_args = (b["values"], b["old_values"], b["returns"], mask, ends)
    close64(sapo_value_loss(*value_args), ref_sapo_value_loss(*value_args))
    close64(masked_whiten(b["advantages"], mask), as_tensor(ref_masked_whiten(b["advantages"], mask)))
