"""A deliberately naive reference for `openrlhf_sapo.algo`, written straight from SAPO_SPEC.md §1-4.

Everything is a per-sample, per-token Python loop over plain floats (or 0-d torch tensors, so that
autograd works when a test passes a tensor with ``requires_grad=True``). Nothing here is vectorised
or clever: it exists to be obviously right, not fast.

Conventions:
- inputs are [B, T] tensors or nested lists; outputs are nested lists ``out[b][t]`` (plain floats or
  bools, or 0-d tensors where an input required grad) and losses are a single number;
- a token is valid where ``action_mask`` is truthy; nothing is ever read at an invalid position;
- a segment is a maximal run of valid tokens closed by a segment end; invalid tokens are skipped and
  belong to no segment; the last valid token of a response always closes a segment.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch


# ----------------------------------------------------------------------------------------- helpers
def _rows(x):
    """[B, T] tensor or nested list -> nested list; elements stay 0-d tensors when x requires grad."""
    if isinstance(x, torch.Tensor):
        if x.requires_grad:
            return [[x[b, t] for t in range(x.shape[1])] for b in range(x.shape[0])]
        if x.is_floating_point():
            return x.detach().double().tolist()
        return x.detach().tolist()
    return [list(r) for r in x]


def _mask_rows(action_mask):
    return [[bool(v) for v in row] for row in _rows(action_mask)]


def _exp(v):
    return torch.exp(v) if isinstance(v, torch.Tensor) else math.exp(v)


def _clamp(v, lo, hi):
    return max(lo, min(hi, v))


def _zeros_like(mask):
    return [[0.0 for _ in row] for row in mask]


def segments_of_row(mask_row, ends_row):
    """Split one response into segments: a list of lists of (valid) token indices, in order.

    Ends on invalid tokens are ignored; a run of valid tokens left open after the last end is
    closed by the last valid token.
    """
    segments, current = [], []
    for t, valid in enumerate(mask_row):
        if not valid:
            continue
        current.append(t)
        if ends_row[t]:
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    return segments


def _segments(action_mask, segment_ends):
    mask = _mask_rows(action_mask)
    ends = _mask_rows(segment_ends)
    return mask, [segments_of_row(m, e) for m, e in zip(mask, ends)]


def _ends_from_positions(mask, positions_per_row):
    """Bool [B][T] with the given positions marked, plus each row's last valid token."""
    out = [[False] * len(row) for row in mask]
    for b, row in enumerate(mask):
        valid = [t for t, v in enumerate(row) if v]
        for t in positions_per_row[b]:
            out[b][t] = True
        if valid:
            out[b][valid[-1]] = True
    return out


# ------------------------------------------------------------------------------------ segmentation
def topk_count(n: int, topk_percent: float) -> int:
    """k = max(ceil(n * p / 100), 1), computed exactly with p read as the decimal it is written as."""
    exact = Fraction(n) * Fraction(str(topk_percent)) / 100
    return max(math.ceil(exact), 1)


def ref_entropy_segment_ends(entropy, action_mask, topk_percent=30.0):
    """The k highest-entropy valid tokens (ties: lowest index first) + the last valid token."""
    mask, ent = _mask_rows(action_mask), _rows(entropy)
    chosen = []
    for b, row in enumerate(mask):
        valid = [t for t, v in enumerate(row) if v]
        if not valid:
            chosen.append([])
            continue
        k = topk_count(len(valid), topk_percent)
        # sort by entropy descending, then index ascending: the first k are the ends
        ranked = sorted(valid, key=lambda t: (-float(ent[b][t]), t))
        chosen.append(ranked[:k])
    return _ends_from_positions(mask, chosen)


def ref_fixed_segment_ends(action_mask, length):
    """Every `length`-th valid token (counting valid tokens only) + the last valid token."""
    mask = _mask_rows(action_mask)
    chosen = []
    for row in mask:
        count, picks = 0, []
        for t, valid in enumerate(row):
            if valid:
                count += 1
                if count % length == 0:
                    picks.append(t)
        chosen.append(picks)
    return _ends_from_positions(mask, chosen)


def ref_lowprob_segment_ends(log_probs, action_mask, threshold, every_k):
    """Every `every_k`-th valid token with exp(log_prob) < threshold + the last valid token."""
    mask, lp = _mask_rows(action_mask), _rows(log_probs)
    chosen = []
    for b, row in enumerate(mask):
        count, picks = 0, []
        for t, valid in enumerate(row):
            if valid and math.exp(float(lp[b][t])) < threshold:
                count += 1
                if count % every_k == 0:
                    picks.append(t)
        chosen.append(picks)
    return _ends_from_positions(mask, chosen)


def ref_newline_segment_ends(token_ids, action_mask, newline_table):
    """Every valid token whose id is a newline token + the last valid token."""
    mask, ids = _mask_rows(action_mask), _rows(token_ids)
    table = [bool(v) for v in (newline_table.tolist() if isinstance(newline_table, torch.Tensor) else newline_table)]
    chosen = [[t for t, valid in enumerate(row) if valid and table[int(ids[b][t])]] for b, row in enumerate(mask)]
    return _ends_from_positions(mask, chosen)


# ------------------------------------------------------------------------------------- segment GAE
def ref_segment_gae(rewards, values, action_mask, segment_ends, gamma=1.0, lambd=0.99, value_at="end"):
    """Segment-level GAE (spec §2, no whitening): per-token advantages and returns, 0 on padding."""
    mask, segs = _segments(action_mask, segment_ends)
    r, v = _rows(rewards), _rows(values)
    adv, ret = _zeros_like(mask), _zeros_like(mask)
    for b, segments in enumerate(segs):
        seg_reward = [sum(r[b][t] for t in seg) for seg in segments]
        read_at = [seg[-1] if value_at == "end" else seg[0] for seg in segments]
        seg_value = [v[b][t] for t in read_at]
        next_adv, next_value = 0.0, 0.0
        for m in reversed(range(len(segments))):
            delta = seg_reward[m] + gamma * next_value - seg_value[m]
            a = delta + gamma * lambd * next_adv
            for t in segments[m]:
                adv[b][t] = a
                ret[b][t] = a + seg_value[m]
            next_adv, next_value = a, seg_value[m]
    return adv, ret


def ref_segment_mean(x, action_mask, segment_ends):
    """Per token: mean of x over the valid tokens of its segment; 0 on padding."""
    mask, segs = _segments(action_mask, segment_ends)
    xs = _rows(x)
    out = _zeros_like(mask)
    for b, segments in enumerate(segs):
        for seg in segments:
            mean = sum(xs[b][t] for t in seg) / len(seg)
            for t in seg:
                out[b][t] = mean
    return out


# ----------------------------------------------------------------------------------------- losses
def ref_sapo_policy_loss(
    log_probs,
    old_log_probs,
    advantages,
    action_mask,
    segment_ends,
    clip_eps_low=0.2,
    clip_eps_high=0.28,
    dual_clip=3.0,
    ratio="segment",
):
    """Segment-ratio clipped surrogate (spec §3), token mean over the batch's valid tokens."""
    mask, segs = _segments(action_mask, segment_ends)
    lp, old, adv = _rows(log_probs), _rows(old_log_probs), _rows(advantages)
    total, count = 0.0, 0
    for b, segments in enumerate(segs):
        for seg in segments:
            x = {t: _clamp(lp[b][t] - old[b][t], -20.0, 20.0) for t in seg}
            seg_log_ratio = sum(x[t] for t in seg) / len(seg)
            for t in seg:
                s = _exp(seg_log_ratio) if ratio == "segment" else _exp(x[t])
                a = adv[b][t]
                loss = max(-a * s, -a * _clamp(s, 1.0 - clip_eps_low, 1.0 + clip_eps_high))
                if dual_clip is not None and a < 0:
                    loss = min(loss, -a * dual_clip)
                total = total + loss
                count += 1
    return total / count if count else 0.0


def ref_naive_is_policy_loss(log_probs, old_log_probs, advantages, action_mask, segment_ends, **kw):
    """The naive-IS ablation: token ratios, segment advantages."""
    return ref_sapo_policy_loss(log_probs, old_log_probs, advantages, action_mask, segment_ends, ratio="token", **kw)


def ref_sapo_value_loss(values, old_values, returns, action_mask, segment_ends, clip_eps=0.5, value_at="end"):
    """Clipped value loss (spec §4) averaged over the tokens where each segment's value is read."""
    mask, segs = _segments(action_mask, segment_ends)
    v, v_old, ret = _rows(values), _rows(old_values), _rows(returns)
    total, count = 0.0, 0
    for b, segments in enumerate(segs):
        for seg in segments:
            t = seg[-1] if value_at == "end" else seg[0]
            unclipped = (v[b][t] - ret[b][t]) ** 2
            if clip_eps is None:
                loss = 0.5 * unclipped
            else:
                v_clip = v_old[b][t] + _clamp(v[b][t] - v_old[b][t], -clip_eps, clip_eps)
                loss = 0.5 * max(unclipped, (v_clip - ret[b][t]) ** 2)
            total = total + loss
            count += 1
    return total / count if count else 0.0


# -------------------------------------------------------------------------------------- whitening
def ref_masked_whiten(x, action_mask, eps=1e-8, clamp=None):
    """(x - mean) / sqrt(unbiased var + eps) over the batch's valid tokens, optional clamp; 0 on padding."""
    mask, xs = _mask_rows(action_mask), _rows(x)
    vals = [xs[b][t] for b, row in enumerate(mask) for t, valid in enumerate(row) if valid]
    out = _zeros_like(mask)
    if not vals:
        return out
    n = len(vals)
    mean = sum(vals) / n
    var = sum((u - mean) ** 2 for u in vals) / (n - 1)  # unbiased: n >= 2 required
    scale = 1.0 / math.sqrt(var + eps)
    for b, row in enumerate(mask):
        for t, valid in enumerate(row):
            if valid:
                w = (xs[b][t] - mean) * scale
                out[b][t] = w if clamp is None else _clamp(w, -clamp, clamp)
    return out
