"""The statistics of the study's report (demo/study_report.py) and its diagnosis (demo/study_diagnosis.py):
Student t intervals over seeds, percentile bootstrap over steps, the seeds a resolution needs, the verdict
sentence, and the per-run quantities they are computed from."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from openrlhf_sapo.demo.report import curve, eval_key

RNG_SEED = 0  # bootstrap resampling is deterministic: the same runs give the same report


def t_critical(df: int) -> float:
    """Two-sided 95% Student t quantile."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:  # the table for small df, the normal quantile beyond
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
        return table.get(df, 1.96 + 2.5 / max(df, 1))


def mean_ci(values) -> Tuple[float, float, float]:
    """(mean, low, high) of the 95% t-interval; the interval is NaN with fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    if x.size == 1:
        return float(x[0]), math.nan, math.nan
    half = t_critical(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


def bootstrap_ci(values, n: int = 2000) -> Tuple[float, float, float]:
    """(mean, low, high) of the 95% percentile bootstrap of the mean (for many correlated points: steps)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return (float(x[0]) if x.size else math.nan), math.nan, math.nan
    means = np.random.default_rng(RNG_SEED).choice(x, size=(n, x.size)).mean(1)
    return float(x.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def seeds_needed(paired_sd: float, half_width: float = 2.0) -> Optional[int]:
    """Seeds whose paired 95% interval is at most +-half_width points, for the measured spread."""
    if not math.isfinite(paired_sd):
        return None
    for n in range(2, 1000):
        if t_critical(n - 1) * paired_sd / math.sqrt(n) <= half_width:
            return n
    return None


def verdict(low: float, high: float, n: int, claim: str) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return f"cannot tell at this scale: {n} seed(s) give no interval ({claim})"
    if low > 0:
        return f"holds here: the 95% interval of the paired difference, [{low:+.3g}, {high:+.3g}], is above 0 ({claim})"
    if high < 0:
        return f"does not hold here: the interval [{low:+.3g}, {high:+.3g}] is below 0 ({claim})"
    return (f"cannot tell at this scale: the interval [{low:+.3g}, {high:+.3g}] spans 0 with {n} seeds "
            f"({claim})")


def spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1]) if len(x) > 1 and np.std(rx) > 0 and np.std(ry) > 0 else math.nan



def accuracy_by_step(rows: List[dict]) -> Dict[int, float]:
    """Held-out accuracy (%) at each evaluation step, in step order."""
    key = eval_key(rows)
    if not key:
        return {}
    steps, acc = curve(rows, "eval", key)
    return {int(s): float(100 * a) for s, a in zip(steps, acc)}


def final_accuracy(rows: List[dict]) -> float:
    """Held-out accuracy (%) at the last evaluation."""
    by_step = accuracy_by_step(rows)
    return by_step[max(by_step)] if by_step else math.nan


def late_mean(arm_seeds: Dict[int, List[dict]], key: str, clip: Optional[Tuple[float, float]] = None) -> Dict[int, float]:
    """Per seed, the mean of `key` over the last third of the training steps (each step clipped to `clip`)."""
    out = {}
    for seed, rows in arm_seeds.items():
        steps, values = curve(rows, "train", key)
        if len(steps):
            values = np.clip(values, *clip) if clip else values
            out[seed] = float(values[steps >= steps.max() - (steps.max() - 1) / 3].mean())
    return out
