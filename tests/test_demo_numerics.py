"""A seeded demo gives the same numbers whatever the machine's thread count, vector kernels and MKL
path (demo/numerics.py pins them). Each case is a fresh process, as a new machine would be; the
control shows those knobs do change the weights when nothing is pinned (so the check can fail)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from openrlhf_sapo.demo.numerics import cpu_has_avx2, pinned_environment

SCRIPT = r"""
import hashlib, json, sys
if sys.argv[2] == "pin":
    from openrlhf_sapo.demo.numerics import pin_cpu_numerics
    pin_cpu_numerics()
import torch
from openrlhf_sapo.demo.tasks import get_task
from openrlhf_sapo.demo.tiny_models import build_tiny_qwen2_5_vl
from openrlhf_sapo.demo.warm_start import warm_start
out = sys.argv[1]
build_tiny_qwen2_5_vl(out + "/base")
warm_start(out + "/base", get_task("digits"), out + "/warm", steps=6, batch_size=8, progress=False, eval_n=0)
digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()
print(json.dumps({"base": digest(out + "/base/model.safetensors"), "warm": digest(out + "/warm/model.safetensors"),
                  "threads": torch.get_num_threads(), "kernels": torch.backends.cpu.get_cpu_capability()}))
"""

# What differs between machines of one kind, as the parent environment of a fresh process.
MACHINES = {
    "as is": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    "scalar kernels, other MKL path": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
}


def _weights(tmp_path, name, extra_env, mode):
    env = {k: v for k, v in os.environ.items() if k not in pinned_environment(True)}
    env.update(extra_env)
    out = tmp_path / name.replace(" ", "_").replace(",", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(out), mode], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_avx2(), reason="the pinned kernels are AVX2's")
def test_pinned_numerics_give_the_same_weights_on_every_machine(tmp_path):
    pinned = {name: _weights(tmp_path, "pin " + name, env, "pin") for name, env in MACHINES.items()}
    assert {r["threads"] for r in pinned.values()} == {2} and {r["kernels"] for r in pinned.values()} == {"AVX2"}
    first = pinned["as is"]
    for name, result in pinned.items():
        assert result == first, f"pinned numerics differ on '{name}': {result} vs {first}"
    # Control: unpinned, these knobs give other weights, so the equality above is not vacuous. Not every
    # knob every time: under load MKL may drop to one thread by itself (MKL_DYNAMIC), so "as is" can
    # equal "1 thread"; the scalar kernels always differ.
    loose = {name: _weights(tmp_path, "loose " + name, env, "loose")["warm"] for name, env in MACHINES.items()}
    assert len(set(loose.values())) >= 2, loose


def test_pinned_environment():
    assert pinned_environment(False) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert pinned_environment(True)["ATEN_CPU_CAPABILITY"] == "avx2"
