"""The 2-node cluster harness (tests/cluster/harness.py) and the CPU mode's fail-fast on a real cluster.

Real namespaces, a real veth pair and real `ray start` processes; every test checks that nothing
it started is left (processes by pid, namespaces by name). Skipped, with the harness's reason,
where namespaces cannot be made.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.cluster import harness
from tests.cluster.harness import Cluster, ClusterUnavailable

try:
    harness.check_can_create(min_free_gib=2.0)
    UNAVAILABLE = None
except ClusterUnavailable as err:
    UNAVAILABLE = str(err)

needs_namespaces = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"no 2-node cluster here: {UNAVAILABLE}")


def namespaces() -> set:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is gone for our purposes
        return f.read().split()[2] != "Z"


def test_unavailable_reasons_name_the_fix(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterUnavailable, match="needs root"):
        harness.check_can_create()
    monkeypatch.undo()
    if UNAVAILABLE is None:
        with pytest.raises(ClusterUnavailable, match="GiB of memory is available"):
            harness.check_can_create(min_free_gib=10_000)


@needs_namespaces
def test_cluster_starts_two_nodes_refuses_a_too_small_run_and_leaves_nothing(tmp_path):
    before = namespaces()
    with Cluster(str(tmp_path), gpus_per_node=1, cpus_per_node=2, tag=f"t{os.getpid()}") as cluster:
        assert sorted(cluster.alive_nodes()) == ["10.77.0.1", "10.77.0.2"]
        ray_pids = [node.proc.pid for node in cluster.nodes.values()]
        made = {node.namespace for node in cluster.nodes.values()}
        assert made <= namespaces()
        # The CPU mode joins this cluster and refuses, at once, a run needing more GPUs than it declares.
        code = (
            "import sys, time; from openrlhf_sapo.cli import train_ppo_ray as cli; "
            "from openrlhf_sapo.utils import cpu_compat; "
            "args = cli.upstream_hierarchize()(cli.build_parser().parse_args(["
            "'--actor.model_name_or_path', 'm', '--reward.remote_url', 'r.py', '--data.prompt_dataset', 'd', "
            "'--actor.num_gpus_per_node', '4', '--vllm.num_engines', '1', '--algo.kl.init_coef', '0'])); t = time.time()\n"
            "try:\n    cpu_compat.start_or_join_ray_on_cpu(args, {})\nexcept RuntimeError as err:\n"
            "    print('REFUSED', round(time.time() - t), err)"
        )
        out = cluster.python(code, timeout=120)
        assert "REFUSED" in out and "declares 2 GPUs" in out and "places 5 GPU bundles" in out, out
        assert int(out.split()[1]) < 30
    assert namespaces() == before
    assert not any(alive(pid) for pid in ray_pids)


@needs_namespaces
def test_a_taken_port_fails_fast_and_teardown_still_runs(tmp_path):
    before = namespaces()
    cluster = Cluster(str(tmp_path), tag=f"p{os.getpid()}")
    try:
        cluster.make_network()
        squatter = cluster.popen([sys.executable, "-c",
                                  "import socket, time; s = socket.socket(); "
                                  f"s.bind(('10.77.0.1', {harness.GCS_PORT})); s.listen(); time.sleep(600)"],
                                 log=str(tmp_path / "squatter.log"))
        time.sleep(2)
        started = time.time()
        with pytest.raises(ClusterUnavailable, match=f"port {harness.GCS_PORT} on 10.77.0.1 .* is taken"):
            cluster.start()
        assert time.time() - started < 30
    finally:
        cluster.stop()
    assert namespaces() == before
    assert not alive(squatter.pid)
