"""SAPO's option defaults, in one place for the CLI (`--algo.sapo.*`) and the trainers.

No imports: the CLI reads this without loading torch or OpenRLHF.
"""

SAPO_DEFAULTS = {
    "segmenter": "entropy",  # the paper's method
    "topk_percent": 30.0,  # paper: best at 30%
    "value_at": "end",  # the authors' release; "start" is the paper's s_m
    "ratio": "segment",  # "token": the naive-IS ablation
    "adv_clip": 5.0,  # the release clamps whitened advantages to [-5, 5]
    "step_pattern": r"Step \d+",
    "lowprob_threshold": 0.9,
    "lowprob_every_k": 4,
    "fixed_length": 64,
}
