"""A segmenter is one registry row (openrlhf_sapo.config.SEGMENTERS): its CLI choice, option flag,
default, range check and the experience maker's inputs all follow from it. The test adds one, in a
fresh process, the way a plugin would (register_segmenter before the CLI is imported)."""

import json
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def every_kth_segment_ends(action_mask: torch.Tensor, token_ids: torch.Tensor, k: int = 2) -> torch.Tensor:
    """The segmenter the test registers: every k-th valid token, and the last one, end a segment."""
    rank = action_mask.long().cumsum(1)
    last = rank == action_mask.long().sum(1, keepdim=True)
    return action_mask.bool() & ((rank % k == 0) | last) & (token_ids >= 0)


SCRIPT = r"""
import json, sys, types
import torch
from openrlhf_sapo import config
config.register_segmenter("every_kth", config.SegmenterSpec(
    "tests.test_segmenter_registry:every_kth_segment_ends", "every k-th token", needs=("token_ids",),
    options=(config.SegmenterOption("k", int, 2, "segment length.", lambda v: v >= 1, "{flag} must be >= 1, got {value}"),)))
from openrlhf_sapo.cli import train_ppo_ray as cli
base = ["--actor.model_name_or_path", "a", "--reward.model_name_or_path", "rm", "--vllm.num_engines", "1",
        "--algo.advantage.estimator", "sapo", "--algo.sapo.segmenter", "every_kth"]
args = cli.parse_args([*base, "--algo.sapo.every_kth_k", "3"])
import contextlib, io
stderr = io.StringIO()
try:
    with contextlib.redirect_stderr(stderr):
        cli.parse_args([*base, "--algo.sapo.every_kth_k", "0"])
except SystemExit:
    pass
refused = [line for line in stderr.getvalue().splitlines() if "error:" in line]
help_text = cli.build_parser().format_help()

from openrlhf_sapo import patches
patches.apply_patches()
from openrlhf_sapo.trainer.ppo_utils.experience_maker import SegmentExperienceMaker
from openrlhf_sapo.trainer.ppo_utils.experience import SegmentExperience
mask = torch.ones(2, 7, dtype=torch.bool)
mask[1, 5:] = False
exp = SegmentExperience(sequences=torch.arange(22).view(2, 11), action_mask=mask, action_log_probs=torch.zeros(2, 7),
                        info={})
maker = SegmentExperienceMaker.__new__(SegmentExperienceMaker)
maker.sapo = vars(args.algo.sapo)
maker.segment(exp)
print(json.dumps({"k": args.algo.sapo.every_kth_k, "segmenter": args.algo.sapo.segmenter, "refused": refused,
                  "in_help": "--algo.sapo.every_kth_k" in help_text and "every_kth (every k-th token)" in help_text,
                  "ends": exp.segment_ends.int().tolist()}))
"""


def test_one_registry_row_adds_a_segmenter():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": REPO})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["segmenter"] == "every_kth" and result["k"] == 3
    assert result["refused"] and result["refused"][0].endswith("error: --algo.sapo.every_kth_k must be >= 1, got 0")
    assert result["in_help"]
    assert result["ends"] == [[0, 0, 1, 0, 0, 1, 1], [0, 0, 1, 0, 1, 0, 0]]
