"""`make e2e-multinode`: the shipped compose file's CPU services (`--profile cpu`: head-cpu, worker-cpu) with the
CPU image of `make docker-test`, and `multinode/submit_sapo.sh` run from the head container, as users run it.

The containers sit on the compose network `sapo`, made `internal: true` by an override file this test
writes (no route out of this machine); the tiny VLM and data of `openrlhf_sapo.demo` (built by the e2e
suite, runs/e2e/assets) are mounted at the same path in both, checkpoints and tensorboard under one
shared folder. First, bad input: a worker started without its head exits 1 after RAY_WAIT_S naming the
head, and a missing image fails naming it (in docker-compose and in this test), leaving nothing behind.
Then it checks what `make e2e` checks for geo3k/sapo.sh: the job succeeds, rewards / critic /
sapo/* metrics are logged, actor ranks sit in both containers, the engines' weights equal the actor's
after every sync. Then the worker container is `docker kill`ed after the step-2 checkpoint (the job
fails: its node is gone), started again (it rejoins the head), and the job resubmitted with
`--ckpt.load_enable` continues at step 3. Everything is removed at the end (`docker-compose down`),
on failure too; the dockerd this test starts, if none runs, is stopped.
A missing CPU image is built first (tools/docker_test.sh with DOCKER_TEST_BUILD_ONLY=1) unless --no-build.
Exit status 0 when every check held, 1 otherwise, 77 (skipped) with the reason when Docker, the image
or compose are not available.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from tests.cluster.e2e import REWARD, prepare_assets, scalars, scaled_flags
from tests.cluster.harness import REPO, ClusterUnavailable, Managed

SKIPPED = 77
COMPOSE_FILE = os.path.join(REPO, "dockerfiles", "docker-compose.multinode.yml")
IMAGE = os.environ.get("SAPO_CPU_IMAGE", "openrlhf-sapo:cpu-test")


def sh(cmd: List[str], timeout: float = 120, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd[:6])} ...` failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    return done


class ComposeCluster(Managed):
    """The compose file's CPU head and worker on an internal network; removed by `docker-compose down`."""

    def __init__(self, workdir: str, assets: str, image: str = IMAGE, build: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.assets = assets
        self.image, self.build = image, build
        self.project = f"sapo-e2e-{os.getpid()}"
        self.override = os.path.join(self.workdir, "override.yml")
        self.dockerd: Optional[subprocess.Popen] = None

    # ------------------------------------------------------------ set-up

    def compose(self, *args: str, timeout: float = 300, check: bool = True, env: Optional[Dict[str, str]] = None):
        environ = {**os.environ, "SAPO_CPU_IMAGE": self.image, "SAPO_DATA_DIR": self.assets,
                   "SAPO_CKPT_DIR": os.path.join(self.workdir, "shared"), "GPUS_PER_NODE": "1", **(env or {})}
        return sh(["docker-compose", "-p", self.project, "-f", COMPOSE_FILE, "-f", self.override, "--profile", "cpu",
                   *args], timeout=timeout, check=check, env=environ, cwd=REPO)

    def start(self) -> None:
        """Docker, the image and the override file; the nodes come up in up()."""
        self.ensure_docker()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.makedirs(os.path.join(self.workdir, "shared"))
        os.chmod(os.path.join(self.workdir, "shared"), 0o777)
        with open(self.override, "w") as f:  # what only this test wants: no route out, assets at their own path
            f.write("services:\n" + "".join(
                f"  {s}:\n    volumes:\n      - {self.assets}:{self.assets}:ro\n" for s in ("head-cpu", "worker-cpu"))
                + "networks:\n  sapo:\n    internal: true\n")

    def up(self) -> None:
        self.compose("up", "-d", "head-cpu")
        self.wait_nodes(1)
        self.compose("up", "-d", "--no-deps", "worker-cpu")
        self.wait_nodes(2)

    def ensure_docker(self) -> None:
        for tool in ("docker", "docker-compose"):
            if not shutil.which(tool):
                if os.geteuid() != 0 or not shutil.which("apt-get"):
                    raise ClusterUnavailable(f"{tool} is missing and cannot be installed here (needs root and apt-get)")
                package = "docker.io" if tool == "docker" else "docker-compose"
                apt_env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
                sh(["apt-get", "update"], timeout=600, check=True, env=apt_env)
                sh(["apt-get", "install", "-y", "--no-install-recommends", package], timeout=600, check=True, env=apt_env)
        if sh(["docker", "info"]).returncode != 0:
            log = open(os.path.join(os.path.dirname(self.workdir), "dockerd.log"), "ab")
            self.dockerd = subprocess.Popen(["dockerd"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            for _ in range(60):
                if sh(["docker", "info"]).returncode == 0:
                    break
                time.sleep(1)
            else:
                raise ClusterUnavailable("dockerd did not start (see dockerd.log)")
        if sh(["docker", "image", "inspect", self.image]).returncode != 0 and self.build:
            print(f"[compose] the CPU image {self.image} is missing: building it (tools/docker_test.sh, "
                  "DOCKER_TEST_BUILD_ONLY=1; several minutes)", flush=True)
            sh(["bash", "tools/docker_test.sh"], timeout=3600, cwd=REPO,
               env=dict(os.environ, IMAGE=self.image, DOCKER_TEST_BUILD_ONLY="1"))
        if sh(["docker", "image", "inspect", self.image]).returncode != 0:
            raise ClusterUnavailable(f"the CPU image {self.image} is missing and was not built: build it with "
                                     "`make docker-test` (or set SAPO_CPU_IMAGE to an image built from "
                                     "dockerfiles/Dockerfile.cpu)")

    def exec(self, service: str, cmd: List[str], timeout: float = 120, env: Optional[Dict[str, str]] = None):
        flags = [arg for k, v in (env or {}).items() for arg in ("-e", f"{k}={v}")]
        return self.compose("exec", "-T", *flags, service, *cmd, timeout=timeout, check=False)

    def active_nodes(self) -> int:
        """Nodes the GCS holds alive (a lost node is dropped once its health checks fail)."""
        code = ("import ray; ray.init(address='auto', logging_level='ERROR'); "
                "print('ALIVE', sum(1 for n in ray.nodes() if n['Alive']))")
        out = self.exec("head-cpu", ["python3", "-c", code]).stdout
        found = re.findall(r"^ALIVE (\d+)$", out, re.M)
        return int(found[-1]) if found else 0

    def wait_nodes(self, count: int, timeout: float = 120) -> None:
        """Until exactly `count` nodes are active."""
        deadline, seen = time.time() + timeout, None
        while time.time() < deadline:
            seen = self.active_nodes()
            if seen == count:
                return
            time.sleep(3)
        logs = self.compose("logs", "--tail", "5", "--no-color", check=False).stdout
        raise ClusterUnavailable(f"the compose cluster did not reach {count} active Ray nodes in {timeout:.0f} s "
                                 f"({seen} active); the containers' last lines:\n{logs}")

    def running(self) -> List[str]:
        """This project's containers that exist (running or not)."""
        out = sh(["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}"]).stdout
        return out.split()

    def ip(self, service: str) -> str:
        return self.exec(service, ["hostname", "-i"]).stdout.split()[0]

    def stop(self) -> None:
        if os.path.exists(self.override):
            with contextlib.suppress(Exception):
                self.compose("down", "-v", "--remove-orphans", "-t", "5", timeout=180, check=False)
        if self.dockerd is not None:
            self.dockerd.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.dockerd.wait(timeout=60)
            if self.dockerd.poll() is None:
                self.dockerd.kill()
            self.dockerd = None
        self._restore_signals()


# ---------------------------------------------------------------- the run


def job_env(paths: Dict[str, str], run_name: str) -> Dict[str, str]:
    return {
        "RAY_ADDRESS": "http://127.0.0.1:8265", "NNODES": "2", "GPUS_PER_NODE": "1", "SCRIPT": "geo3k/sapo.sh",
        "MODEL_PATH": paths["vlm"], "TRAIN_DATA": os.path.join(paths["vlm_data"], "train.jsonl"),
        "EVAL_DATA": os.path.join(paths["vlm_data"], "heldout.jsonl"),
        "REWARD_FUNC": os.path.relpath(REWARD, REPO),  # relative to the job's working dir
        "SAVE_ROOT": "/checkpoints/ckpt", "LOG_ROOT": "/checkpoints/tb", "RUN_NAME": run_name, "EVAL_STEPS": "-1",
        "SAVE_STEPS": "2", "MICRO_TRAIN_BATCH": "4", "MICRO_ROLLOUT_BATCH": "4", "PYTHON": "python3", "SEED": "42",
    }


def bad_input(cluster: ComposeCluster) -> Dict[str, bool]:
    """Before the cluster is up: a worker whose head never answers, an image that does not exist."""
    started = time.time()
    cluster.compose("up", "-d", "--no-deps", "worker-cpu", env={"RAY_WAIT_S": "5"})
    worker = f"{cluster.project}_worker-cpu_1"
    try:
        status = sh(["docker", "wait", worker], timeout=90).stdout.strip()
    except subprocess.TimeoutExpired:
        status = "still running after 90 s"
    seconds = time.time() - started
    logs = sh(["docker", "logs", worker])
    cluster.compose("rm", "-fsv", "worker-cpu")
    missing = "openrlhf-sapo:no-such-image"
    up = cluster.compose("up", "-d", "head-cpu", env={"SAPO_CPU_IMAGE": missing}, check=False, timeout=120)
    try:
        with ComposeCluster(cluster.workdir + "-missing", cluster.assets, image=missing, build=False):
            harness_message = ""
    except ClusterUnavailable as err:
        harness_message = str(err)
    return {
        f"a worker without its head exits 1 ({seconds:.0f} s, status {status})": status == "1" and seconds < 60,
        "... naming the head and RAY_WAIT_S": "the Ray head head-cpu:6379 did not answer within 5 s (RAY_WAIT_S)"
        in logs.stdout + logs.stderr,
        "a missing image: docker-compose up fails naming it": up.returncode != 0 and missing in up.stdout + up.stderr,
        "a missing image: make e2e-multinode (--no-build) names it and make docker-test":
        missing in harness_message and "make docker-test" in harness_message,
        "nothing left of either": not cluster.running(),
    }


def run(workdir: str, timeout: float, build: bool = True) -> Dict[str, Dict[str, bool]]:
    assets_root = os.path.join(os.path.dirname(workdir), "e2e", "assets")
    paths = prepare_assets(assets_root)
    flags = [*scaled_flags(4, max_len=128), "--algo.kl.init_coef", "0"]
    results = {}
    with ComposeCluster(workdir, os.path.abspath(assets_root), build=build) as cluster:
        results["bad input"] = bad_input(cluster)
        cluster.up()
        shared = os.path.join(cluster.workdir, "shared")
        ips = {cluster.ip("head-cpu"), cluster.ip("worker-cpu")}
        submit = ["bash", "examples/scripts/multinode/submit_sapo.sh", *flags]

        # 1. a whole run
        done = cluster.exec("head-cpu", submit, timeout=timeout, env=job_env(paths, "compose-sapo"))
        log = done.stdout + done.stderr
        with open(os.path.join(cluster.workdir, "compose-sapo.log"), "w") as f:
            f.write(log)
        tb = scalars(os.path.join(shared, "tb", "compose-sapo"))
        ranks = set(re.findall(r"actor rank \d+/\d+ on node (\S+)", log))
        results["submit_sapo.sh from the head container"] = {
            "job succeeded": done.returncode == 0 and "succeeded" in log,
            "steps 1..4 logged": sorted(tb.get("train/reward", {})) == [1, 2, 3, 4],
            "critic and sapo/* metrics logged": bool(tb.get("train/critic_loss"))
            and any(t.startswith("train/sapo/") for t in tb),
            "actor ranks in both containers": ranks == ips,
            "weights synced to the engines after every step": log.count("weight sync check:") >= 4,
        }

        # 2. the worker container killed after the step-2 checkpoint, started again, the job resumed
        env = dict(job_env(paths, "compose-kill"), RAY_JOB_NO_WAIT="1")
        submitted = cluster.exec("head-cpu", submit, timeout=120, env=env)
        job_ids = re.findall(r"raysubmit_\w+", submitted.stdout + submitted.stderr)
        ckpt = os.path.join(shared, "ckpt", "compose-kill", "ckpt", "_actor")
        deadline = time.time() + timeout
        while time.time() < deadline and not glob_step(ckpt, 2):
            time.sleep(3)
        saved = glob_step(ckpt, 2)
        killed = sh(["docker", "kill", f"{cluster.project}_worker-cpu_1"]).returncode == 0 if saved else False
        cluster.wait_nodes(1)  # the head has noticed the lost node (no job lands on it any more)
        cluster.compose("start", "worker-cpu")
        cluster.wait_nodes(2)
        for job_id in job_ids[:1]:  # the job that lost its node: stopped, so it frees its placement
            cluster.exec("head-cpu", ["ray", "job", "stop", job_id], env={"RAY_ADDRESS": "http://127.0.0.1:8265"})
        done = cluster.exec("head-cpu", [*submit, "--ckpt.load_enable"], timeout=timeout, env=job_env(paths, "compose-kill"))
        log = done.stdout + done.stderr
        with open(os.path.join(cluster.workdir, "compose-kill-resumed.log"), "w") as f:
            f.write(log)
        tb = scalars(os.path.join(shared, "tb", "compose-kill"))
        results["worker container killed, restarted, resumed"] = {
            "killed after the step-2 checkpoint": bool(saved and killed),
            "resumed job succeeded": done.returncode == 0 and "succeeded" in log,
            "resumed from step 2": "resumed from step 2" in log,
            "steps 3..4 logged after the resume": {3, 4} <= set(tb.get("train/reward", {})),
            "actor ranks in both containers again": set(re.findall(r"actor rank \d+/\d+ on node (\S+)", log))
            == {cluster.ip("head-cpu"), cluster.ip("worker-cpu")},
        }
    return results


def glob_step(ckpt: str, step: int) -> bool:
    return os.path.isdir(ckpt) and any(name.startswith(f"global_step{step}") for name in os.listdir(ckpt))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="the compose file's CPU cluster, geo3k/sapo.sh submitted from its head")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "e2e-multinode"))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--no-build", dest="build", action="store_false",
                        help="fail instead of building the CPU image when it is missing")
    args = parser.parse_args(argv)
    try:
        results = run(os.path.abspath(args.workdir), args.timeout, args.build)
    except ClusterUnavailable as err:
        print(f"[compose] skipped: {err}", flush=True)
        return SKIPPED
    failed = 0
    for name, checks in results.items():
        print(f"[compose] {name}: " + "; ".join(f"{'PASS' if ok else 'FAIL'} {c}" for c, ok in checks.items()), flush=True)
        failed += sum(not ok for ok in checks.values())
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
