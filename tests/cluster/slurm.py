"""`make e2e-slurm`: the shipped Slurm script, `sbatch examples/scripts/multinode/slurm_sapo.sbatch`, on a
2-node Slurm cluster made on this machine.

The two nodes are the e2e harness's network namespaces (harness.Cluster.make_network: 10.77.0.1 and
10.77.0.2 joined by a veth pair, nothing else reachable). Each node's daemons also get their own UTS,
mount and PID namespaces, as on a machine of their own: hostname `sapo-head` / `sapo-worker`, a private
/etc/hosts naming both nodes (the script asks `hostname --ip-address`), a private /tmp/ray (one Ray node
per machine), and a private process table (Ray finds its local node by scanning for raylets).
slurmctld runs on the head, a slurmd on each node, munged with a key made for the run; the
slurm.conf is written here (each node declares 1 GPU as a count-only GRES: the CPU mode's declared GPU).

Runs:
  1. geo3k/sapo.sh scaled down by its documented variables and flags (the tiny VLM and data of
     `openrlhf_sapo.demo`), submitted with `sbatch --nodes=2 --gpus-per-node=1`: the job's Ray head and
     worker come up on the two nodes, training finishes, and the job is COMPLETED with exit code 0
     (`scontrol show job`: Slurm's `sacct` needs a slurmdbd database, which this set-up does not run).
  2. the same job where the worker's `ray start` fails (a `ray` on PATH that refuses on sapo-worker):
     the script must fail after RAY_WAIT_S with its message, and the job end FAILED.
Everything started is stopped by process id and the namespaces deleted, also on failure and Ctrl-C.
Exit status 0 when every check held, 1 otherwise, 77 (skipped) with the reason when Slurm or the
namespaces are not available.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.cluster.e2e import REWARD, prepare_assets, scalars, scaled_flags
from tests.cluster.harness import REPO, Cluster, ClusterUnavailable, Managed

SKIPPED = 77
SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
HOSTS = {"head": "sapo-head", "worker": "sapo-worker"}


def ensure_slurm() -> None:
    """Debian's Slurm 22.05 and munge, installed when missing (root, package registry reachable)."""
    if all(shutil.which(tool) for tool in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and cannot be installed here (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *SLURM_PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-500:]}")


def slurm_conf(workdir: str, nodes: Dict[str, str]) -> str:
    lines = [
        "ClusterName=sapo", f"SlurmctldHost={HOSTS['head']}({nodes['head']})", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={workdir}/munge.sock",
        f"StateSaveLocation={workdir}/state", f"SlurmdSpoolDir={workdir}/spool-%n",
        f"SlurmctldPidFile={workdir}/slurmctld.pid", f"SlurmdPidFile={workdir}/slurmd-%n.pid",
        f"SlurmctldLogFile={workdir}/slurmctld.log", f"SlurmdLogFile={workdir}/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "SchedulerType=sched/builtin",
        "ReturnToService=2", "GresTypes=gpu", "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none", "SlurmctldPort=6817", "SlurmdPort=6818", "MinJobAge=3600",
        "KillWait=10", "SlurmdTimeout=60", "InactiveLimit=0",
    ]
    cpus = os.cpu_count() or 2
    for role, host in HOSTS.items():
        lines.append(f"NodeName={host} NodeAddr={nodes[role]} CPUs={cpus} RealMemory=4000 Gres=gpu:1 State=UNKNOWN")
    lines.append("PartitionName=sapo Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
    return "\n".join(lines) + "\n"


class SlurmCluster(Managed):
    """munged, slurmctld and two slurmd in the harness's namespaces; stopped by pid (also on Ctrl-C)."""

    def __init__(self, workdir: str):
        self.workdir = os.path.abspath(workdir)
        self.network = Cluster(os.path.join(self.workdir, "net"), tag=f"s{os.getpid()}")
        self.procs: List[subprocess.Popen] = []
        self.conf = os.path.join(self.workdir, "slurm.conf")

    # ------------------------------------------------------------ set-up

    def env(self) -> Dict[str, str]:
        env = self.network.node_env()
        env["SLURM_CONF"] = self.conf
        return env

    def start(self) -> None:
        ensure_slurm()
        shutil.rmtree(self.workdir, ignore_errors=True)
        for sub in ("state", "net", "tmp-ray-head", "tmp-ray-worker"):
            os.makedirs(os.path.join(self.workdir, sub))
        self.network.make_network()
        nodes = {role: node.address for role, node in self.network.nodes.items()}
        with open(self.conf, "w") as f:
            f.write(slurm_conf(self.workdir, nodes))
        with open(os.path.join(self.workdir, "gres.conf"), "w") as f:
            # Slurm drops a GPU without a device file: /dev/null stands for the declared GPU (nothing binds it)
            f.write("AutoDetect=off\n" + "".join(f"NodeName={h} Name=gpu File=/dev/null\n" for h in HOSTS.values()))
        with open(os.path.join(self.workdir, "cgroup.conf"), "w") as f:
            f.write("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\nConstrainCores=no\nConstrainRAMSpace=no\n"
                    "ConstrainDevices=no\n")
        with open(os.path.join(self.workdir, "hosts"), "w") as f:
            f.write("127.0.0.1 localhost\n" + "".join(f"{nodes[r]} {h}\n" for r, h in HOSTS.items()))
        key = os.path.join(self.workdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o400)
        self.spawn(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={self.workdir}/munge.sock",
                    f"--pid-file={self.workdir}/munged.pid", f"--log-file={self.workdir}/munged.log",
                    f"--seed-file={self.workdir}/munged.seed"], "munged")
        self.wait_for(lambda: os.path.exists(f"{self.workdir}/munge.sock"), 20, "munged did not start")
        self.spawn(self.on_node("head", ["slurmctld", "-D", "-i", "-f", self.conf]), "slurmctld")
        for role, host in HOSTS.items():
            self.spawn(self.on_node(role, ["slurmd", "-D", "-N", host, "-f", self.conf]), f"slurmd-{role}")
        self.wait_for(self.nodes_idle, 90, "the Slurm nodes did not become idle (see slurmctld.log / slurmd-*.log)")

    def on_node(self, role: str, cmd: List[str]) -> List[str]:
        """cmd as a process of node `role`: its network namespace, and its own hostname, /etc/hosts,
        /tmp/ray and process table."""
        node = self.network.nodes[role]
        # `ip netns exec` mounts a fresh /sys without the cgroup hierarchies, which slurmd initialises
        # even with proctrack/linuxproc: mount the v1 ones it reads again (cgroup.conf names v1).
        cgroups = "".join(f"mkdir -p /sys/fs/cgroup/{c} && mount -t cgroup -o {c} cgroup /sys/fs/cgroup/{c} && "
                          for c in ("freezer", "cpuset", "memory", "devices"))
        setup = (f"hostname {HOSTS[role]} && mount --bind {self.workdir}/hosts /etc/hosts && "
                 f"mkdir -p /tmp/ray && mount --bind {self.workdir}/tmp-ray-{role} /tmp/ray && "
                 f"mount -t tmpfs cgroup_root /sys/fs/cgroup && {cgroups}exec \"$@\"")
        return ["ip", "netns", "exec", node.namespace, "unshare", "--uts", "--mount", "--pid", "--fork", "--mount-proc",
                "sh", "-c", setup, "sh", *cmd]

    def spawn(self, cmd: List[str], name: str) -> subprocess.Popen:
        log = open(os.path.join(self.workdir, f"{name}.out"), "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait_for(ready, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(1)
        raise ClusterUnavailable(message)

    def client(self, cmd: List[str], timeout: float = 30, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """A Slurm client command, run from the head node's network."""
        return subprocess.run(["ip", "netns", "exec", self.network.head.namespace, *cmd], capture_output=True,
                              text=True, timeout=timeout, env={**self.env(), **(env or {})}, cwd=REPO)

    def nodes_idle(self) -> bool:
        out = self.client(["sinfo", "--noheader", "-N", "-o", "%N %t"]).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return set(states) == set(HOSTS.values()) and all(s == "idle" for s in states.values())

    # ------------------------------------------------------------ jobs

    def sbatch(self, args: List[str], env: Dict[str, str]) -> str:
        done = self.client(["sbatch", "--parsable", *args], env=env)
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr.strip()}")
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = self.client(["scontrol", "show", "job", job_id, "--oneliner"]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, timeout: float) -> Dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return info
            time.sleep(5)
        self.client(["scancel", job_id])
        raise TimeoutError(f"job {job_id} did not end in {timeout:.0f} s")

    # ------------------------------------------------------------ tear-down

    def stop(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self.procs.clear()
        self.network.stop()  # kills whatever is left in the namespaces (job steps, Ray), deletes them
        self._restore_signals()


# ---------------------------------------------------------------- the runs


def job_env(assets: Dict[str, str], workdir: str, **extra: str) -> Dict[str, str]:
    """geo3k/sapo.sh scaled down through its documented variables (as `make e2e` does)."""
    return {
        "SCRIPT": "geo3k/sapo.sh", "MODEL_PATH": assets["vlm"], "TRAIN_DATA": os.path.join(assets["vlm_data"], "train.jsonl"),
        "EVAL_DATA": os.path.join(assets["vlm_data"], "heldout.jsonl"), "REWARD_FUNC": REWARD,
        "SAVE_ROOT": os.path.join(workdir, "ckpt"), "LOG_ROOT": os.path.join(workdir, "tb"), "RUN_NAME": "slurm-sapo",
        "EVAL_STEPS": "-1", "SAVE_STEPS": "-1", "MICRO_TRAIN_BATCH": "4", "MICRO_ROLLOUT_BATCH": "4",
        "PYTHON": sys.executable, "SEED": "42", "RAY_WAIT_S": "60", **extra,
    }


def failing_ray(workdir: str) -> str:
    """A folder with a `ray` that refuses `ray start --address` on sapo-worker (a worker that cannot join)."""
    folder = os.path.join(workdir, "broken-ray")
    os.makedirs(folder, exist_ok=True)
    real = os.path.join(os.path.dirname(sys.executable), "ray")
    with open(os.path.join(folder, "ray"), "w") as f:
        f.write(f"#!/bin/sh\nif [ \"$(hostname)\" = {HOSTS['worker']} ] && [ \"$1\" = start ]; then\n"
                "  echo 'ray start: cannot reach the head (test: a worker that never joins)' >&2; exit 1\nfi\n"
                f"exec {real} \"$@\"\n")
    os.chmod(os.path.join(folder, "ray"), 0o755)
    return folder


def run(workdir: str, timeout: float) -> Dict[str, Dict[str, bool]]:
    assets = prepare_assets(os.path.join(os.path.dirname(workdir), "e2e", "assets"))
    results = {}
    with SlurmCluster(os.path.join(workdir, "slurm")) as slurm:
        script = os.path.join(REPO, "examples", "scripts", "multinode", "slurm_sapo.sbatch")
        out = os.path.join(workdir, "job-%j.out")
        start = time.time()
        job = slurm.sbatch(["--nodes=2", "--gpus-per-node=1", "--time=30", f"--output={out}", "--export=ALL", script,
                            *scaled_flags(2, max_len=128), "--algo.kl.init_coef", "0"], job_env(assets, workdir))
        info = slurm.wait_job(job, timeout)
        log = open(out.replace("%j", job), errors="replace").read()
        tb = scalars(os.path.join(workdir, "tb", "slurm-sapo"))
        ranks = set(re.findall(r"actor rank \d+/\d+ on node (\S+)", log))
        results["sbatch slurm_sapo.sbatch"] = {
            "job COMPLETED, exit 0": info.get("JobState") == "COMPLETED" and info.get("ExitCode") == "0:0",
            "Ray head on sapo-head, worker joined": "Ray head: sapo-head (10.77.0.1:6379), 2 nodes" in log,
            "steps 1..2 logged": sorted(tb.get("train/reward", {})) == [1, 2],
            "sapo/* metrics logged": any(tag.startswith("train/sapo/") for tag in tb),
            "actor ranks on both nodes": ranks == {"10.77.0.1", "10.77.0.2"},
            "weight sync checked": "weight sync check:" in log,
        }
        print(f"[slurm] job {job}: {info.get('JobState')} in {time.time() - start:.0f} s; log {out.replace('%j', job)}",
              flush=True)

        broken = job_env(assets, workdir, RAY_WAIT_S="20", RUN_NAME="slurm-no-worker",
                         PATH=failing_ray(workdir) + os.pathsep + slurm.env()["PATH"])
        start = time.time()
        job = slurm.sbatch(["--nodes=2", "--gpus-per-node=1", "--time=10", f"--output={out}", "--export=ALL", script,
                            *scaled_flags(2, max_len=128)], broken)
        info = slurm.wait_job(job, 300)
        log = open(out.replace("%j", job), errors="replace").read()
        results["a worker that never joins"] = {
            "job FAILED": info.get("JobState") == "FAILED",
            "the script's message": "1 of 2 Ray nodes joined after" in log,
            "nothing submitted": "raysubmit_" not in log,
            "within RAY_WAIT_S + start-up": time.time() - start < 200,
        }
        print(f"[slurm] job {job}: {info.get('JobState')} in {time.time() - start:.0f} s", flush=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="slurm_sapo.sbatch on a 2-node Slurm cluster made here")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "e2e-slurm"))
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args(argv)
    try:
        results = run(os.path.abspath(args.workdir), args.timeout)
    except ClusterUnavailable as err:
        print(f"[slurm] skipped: {err}", flush=True)
        return SKIPPED
    failed = 0
    for name, checks in results.items():
        print(f"[slurm] {name}: " + "; ".join(f"{'PASS' if ok else 'FAIL'} {check}" for check, ok in checks.items()))
        failed += sum(not ok for ok in checks.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
