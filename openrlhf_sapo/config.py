"""SAPO's options in one place for the CLI (`--algo.sapo.*`) and the trainers: the segmenter registry,
the option defaults, the recipe for unset upstream options.

Standard library only: the CLI reads this without loading torch or OpenRLHF.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


SAPO_ESTIMATOR = "sapo"  # the --algo.advantage.estimator choice SAPO adds
# The --actor.policy_loss_type choice of Qwen's Soft Adaptive Policy Optimization (arXiv 2511.20347), a
# baseline that verl and TRL call "sapo"; its temperatures default to the paper's (tau_pos, tau_neg).
SOFT_ADAPTIVE = "soft_adaptive"
SOFT_ADAPTIVE_TAUS = (1.0, 1.05)
VALUE_AT = ("end", "start")  # where a segment's value is read: the release's end, the paper's start (s_m)
RATIOS = ("segment", "token")  # the actor's importance ratio: SAPO's, or the naive-IS ablation's


@dataclass(frozen=True)
class SegmenterOption:
    """One option of a segmenter: the function's keyword `argument`, set by `--algo.sapo.<flag>`
    (flag: `<segmenter>_<argument>` unless given)."""

    argument: str
    type: type
    default: Any
    help: str
    valid: Callable[[Any], bool] = lambda value: True
    error: str = "{flag} is invalid: {value!r}"  # when not valid(value); formatted with flag and value
    flag: Optional[str] = None


@dataclass(frozen=True)
class SegmenterSpec:
    """A segmenter: `function` ("module:name", imported on first use) returns bool [B, T] segment ends
    from `action_mask`, the per-batch tensors in `needs` (entropy, log_probs, token_ids), the
    tokenizer tables in `vocabulary` (token_texts, newline_table; built once per run) and `options`."""

    function: str
    help: str
    needs: Tuple[str, ...] = ()
    vocabulary: Tuple[str, ...] = ()
    options: Tuple[SegmenterOption, ...] = ()


def _valid_regex(pattern) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


_ALGO = "openrlhf_sapo.algo.segmenters"
# One row per segmenter: its CLI choice, flags, defaults and the experience maker's inputs derive from it.
SEGMENTERS: Dict[str, SegmenterSpec] = {
    "entropy": SegmenterSpec(
        f"{_ALGO}:entropy_segment_ends", "the k highest-entropy tokens end a segment; the paper's method",
        needs=("entropy",),
        options=(SegmenterOption(
            "topk_percent", float, 30.0, "percentage p in (0, 100] of a response's tokens that end a segment "
            "(k = max(ceil(n * p / 100), 1)); the paper uses 30.", lambda v: 0.0 < v <= 100.0,
            "{flag} must be in (0, 100], got {value}: it is the percentage of a response's tokens that end a "
            "segment (the paper uses 30)", flag="topk_percent"),)),
    "newline": SegmenterSpec(
        f"{_ALGO}:newline_segment_ends", "a token whose text holds a newline ends a segment",
        needs=("token_ids",), vocabulary=("newline_table",)),
    "step": SegmenterSpec(
        f"{_ALGO}:step_segment_ends", "a segment starts at each --algo.sapo.step_pattern match",
        needs=("token_ids",), vocabulary=("token_texts",),
        options=(SegmenterOption(
            "pattern", str, r"Step \d+", "regular expression of a step marker; a segment starts at each match.",
            _valid_regex, "{flag} {value!r} is not a valid regular expression (the default is 'Step \\d+')"),)),
    "lowprob": SegmenterSpec(
        f"{_ALGO}:lowprob_segment_ends", "every --algo.sapo.lowprob_every_k-th token sampled with probability "
        "< --algo.sapo.lowprob_threshold ends a segment (SPO's cut points)",
        needs=("log_probs",),
        options=(SegmenterOption("threshold", float, 0.9, "a token sampled with probability below this (in (0, 1]) "
                                 "is a cut point.", lambda v: 0.0 < v <= 1.0,
                                 "{flag} must be a probability in (0, 1], got {value}"),
                 SegmenterOption("every_k", int, 4, "every k-th cut point (k >= 1) ends a segment.",
                                 lambda v: v >= 1, "{flag} must be >= 1, got {value}"))),
    "fixed": SegmenterSpec(
        f"{_ALGO}:fixed_segment_ends", "every --algo.sapo.fixed_length tokens (a control without semantics)",
        options=(SegmenterOption("length", int, 64, "segment length in tokens (>= 1).", lambda v: v >= 1,
                                 "{flag} must be >= 1 token, got {value}"),)),
}


def option_flag(segmenter: str, option: SegmenterOption) -> str:
    """The option's `--algo.sapo.<flag>` name (dest `algo.sapo.<flag>`)."""
    return option.flag or f"{segmenter}_{option.argument}"


def segmenter_flags() -> Dict[str, Tuple[str, SegmenterOption]]:
    """flag -> (segmenter, option), for every segmenter option."""
    return {option_flag(name, o): (name, o) for name, spec in SEGMENTERS.items() for o in spec.options}


def register_segmenter(name: str, spec: SegmenterSpec) -> None:
    """Add a segmenter from outside this file (a plugin): before the CLI module is imported, so its
    choice and flags exist. In this repository a segmenter is one row of SEGMENTERS above."""
    if name in SEGMENTERS:
        raise ValueError(f"segmenter {name!r} exists already")
    SEGMENTERS[name] = spec
    for option in spec.options:
        SAPO_DEFAULTS.setdefault(option_flag(name, option), option.default)


SAPO_DEFAULTS = {
    "segmenter": "entropy",  # the paper's method
    "value_at": "end",  # the authors' release; "start" is the paper's s_m
    "ratio": "segment",  # "token": the naive-IS ablation
    "adv_clip": 5.0,  # the release clamps whitened advantages to [-5, 5]
    **{flag: option.default for flag, (_, option) in segmenter_flags().items()},
}

# Upstream options whose default differs from the SAPO recipe (SAPO_SPEC.md sections 3 and 6: the paper's
# Table 7 and the authors' release script). With --algo.advantage.estimator sapo, every one of these the
# user did not pass takes the recipe's value (the CLI says so, and --dry-run shows each value's source).
# dest -> (value, where it comes from)
SAPO_RECIPE = {
    "algo.advantage.gamma": (1.0, "paper Table 7"),
    "algo.advantage.lambd": (0.99, "paper Table 7"),
    "actor.eps_clip_low_high": ([0.2, 0.28], "release script (clip 0.2 / 0.28)"),
    "actor.dual_clip": (3.0, "release (dual clip 3.0)"),
    "algo.kl.init_coef": (0.001, "paper Table 7 (k1 KL in the reward, 0.001)"),
    "algo.kl.estimator": ("k1", "paper Table 7 (k1 KL in the reward, 0.001)"),
}
# A recipe option is not applied when the user set any of these (a symmetric --actor.eps_clip is a choice).
SAPO_RECIPE_OVERRIDDEN_BY = {
    "actor.eps_clip_low_high": ("actor.eps_clip",),
    "algo.kl.init_coef": ("algo.kl.use_loss",),  # KL as a loss (GRPO's way) is not the recipe's KL
    "algo.kl.estimator": ("algo.kl.use_loss",),
}
