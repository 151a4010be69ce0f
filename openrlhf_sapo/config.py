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
