"""A 2-node Ray cluster on one Linux machine: two network namespaces joined by a veth pair.

Ray must never bind this machine's real address (it would reach the outside), so every Ray
process runs inside a namespace that holds only loopback and the pair's test addresses
(10.77.0.1 head, 10.77.0.2 worker; the interface is `sapo0` on both sides, so one
GLOO_SOCKET_IFNAME serves DeepSpeed's gloo groups on every node). Each node is a `ray start
--block` with declared GPUs and CPUs (OpenRLHF places one "GPU" per rank and engine; nothing
calls CUDA on a machine without one). The worker node also has its own PID namespace, so that
Ray's process-table scan finds only that node's raylet there (see `_spawn_ray`).

    with Cluster(workdir) as cluster:           # creates, starts, waits; always tears down
        proc = cluster.popen(["bash", "examples/scripts/text/sapo.sh", ...], log="run.log")
        cluster.kill_node("worker")              # SIGKILL one node's processes (fault tests)

Teardown (also on failure, Ctrl-C and SIGTERM): SIGTERM then SIGKILL to every process group this
harness started (by the pids it recorded), SIGKILL to any process left inside its namespaces
(`ip netns pids`: only processes started there, i.e. by this harness), then the namespaces are
deleted (which removes the veth pair). `ClusterUnavailable` says why a cluster cannot be made
(no root / no `ip`, namespaces refused, a port taken, too little memory); tests skip with it.

`python -m tests.cluster.harness --check` creates and deletes a namespace and prints whether
clusters can be made here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBNET = "10.77.0"
IFACE = "sapo0"
GCS_PORT = 6379
DASHBOARD_PORT = 8265
MIN_FREE_GIB = 8.0  # measured peak of one e2e run here: about 6 GiB


class ClusterUnavailable(RuntimeError):
    """A cluster cannot be created on this machine; the message says why and what would fix it."""


@dataclass
class Node:
    name: str
    namespace: str
    address: str
    temp_dir: str
    proc: Optional[subprocess.Popen] = None


def _run(cmd: List[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kwargs)


def available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def check_can_create(min_free_gib: float = MIN_FREE_GIB) -> None:
    """Raise ClusterUnavailable unless namespaces can be made here and memory suffices."""
    if sys.platform != "linux":
        raise ClusterUnavailable(f"network namespaces need Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        raise ClusterUnavailable("creating network namespaces needs root (run as root, or in a container with "
                                 "CAP_NET_ADMIN and CAP_SYS_ADMIN)")
    if shutil.which("ip") is None:
        raise ClusterUnavailable("the `ip` command (iproute2) is missing: apt-get install iproute2")
    probe = f"sapo-probe-{os.getpid()}"
    made = _run(["ip", "netns", "add", probe], check=False)
    if made.returncode != 0:
        raise ClusterUnavailable(f"`ip netns add` failed ({made.stderr.strip()}): network namespaces are not "
                                 "available here (a container without CAP_SYS_ADMIN?)")
    _run(["ip", "netns", "del", probe], check=False)
    free = available_gib()
    if free < min_free_gib:
        raise ClusterUnavailable(f"only {free:.1f} GiB of memory is available; a 2-node CPU cluster with its "
                                 f"training runs needs about {min_free_gib:g} GiB: stop other work first")


class Managed:
    """`with X(...) as x:` for what a test starts: start() (stop() if it fails), stop() on leaving, and on
    SIGINT / SIGTERM (Ctrl-C) stop() then KeyboardInterrupt. Subclasses define start() and stop(), and
    stop() calls _restore_signals()."""

    _old_handlers: dict

    def __enter__(self):
        self._trap_signals()
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _trap_signals(self) -> None:
        def handler(signum, frame):
            self.stop()
            raise KeyboardInterrupt(f"signal {signum}: everything started was stopped")

        self._old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old_handlers[sig] = signal.signal(sig, handler)

    def _restore_signals(self) -> None:
        for sig, old in getattr(self, "_old_handlers", {}).items():
            with contextlib.suppress(ValueError):
                signal.signal(sig, old)
        self._old_handlers = {}


@dataclass
class Cluster(Managed):
    workdir: str
    gpus_per_node: int = 4
    cpus_per_node: int = 8
    env: Dict[str, str] = field(default_factory=dict)
    start_timeout: float = 120.0
    tag: str = field(default_factory=lambda: str(os.getpid()))

    def __post_init__(self):
        self.workdir = os.path.abspath(self.workdir)
        self.nodes = {
            role: Node(role, f"sapo-{role}-{self.tag}", f"{SUBNET}.{i}", os.path.join("/tmp", f"ray-{role}-{self.tag}"))
            for i, role in ((1, "head"), (2, "worker"))
        }
        self._procs: List[subprocess.Popen] = []
        self._made_namespaces: List[str] = []

    # ------------------------------------------------------------ public

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.address}:{GCS_PORT}"

    @property
    def dashboard_address(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    def node_env(self) -> Dict[str, str]:
        """The environment of every process on the cluster (Ray nodes, drivers)."""
        env = dict(os.environ)
        env.update({
            "GLOO_SOCKET_IFNAME": IFACE,  # DeepSpeed's gloo groups across the two namespaces
            # this Python's scripts (ray, for `ray job submit`) first, as in an activated venv
            "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
            "PYTHONPATH": REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
            "RAY_USAGE_STATS_ENABLED": "0",
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        })
        env.update(self.env)
        return env

    def start(self) -> None:
        check_can_create()
        os.makedirs(self.workdir, exist_ok=True)
        if not self._made_namespaces:
            self._make_network()
        head, worker = self.head, self.nodes["worker"]
        common = ["--num-gpus", str(self.gpus_per_node), "--num-cpus", str(self.cpus_per_node),
                  "--disable-usage-stats", "--block"]
        for port in (GCS_PORT, DASHBOARD_PORT):
            self._check_port_free(head, port)
        head.proc = self._spawn_ray(head, ["--head", "--port", str(GCS_PORT), "--include-dashboard", "true",
                                           "--dashboard-host", head.address, "--dashboard-port", str(DASHBOARD_PORT),
                                           *common])
        self._wait_nodes(1)
        worker.proc = self._spawn_ray(worker, ["--address", self.gcs_address, *common])
        self._wait_nodes(2)

    def popen(self, cmd: List[str], log: str, node: str = "head", env: Optional[Dict[str, str]] = None,
              cwd: str = REPO) -> subprocess.Popen:
        """Start `cmd` in a node's namespace (its own process group), stdout+stderr to `log`."""
        full_env = self.node_env()
        full_env["RAY_ADDRESS"] = self.gcs_address
        full_env.update(env or {})
        out = open(log, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.nodes[node].namespace, *cmd], stdout=out,
                                stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True)
        out.close()
        self._procs.append(proc)
        return proc

    def run(self, cmd: List[str], log: str, timeout: float, **kwargs) -> int:
        """popen + wait; on timeout the process group is killed and TimeoutError raised."""
        proc = self.popen(cmd, log, **kwargs)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc, signal.SIGKILL)
            raise TimeoutError(f"{' '.join(cmd[:4])} ... ran over {timeout:.0f} s (log: {log})") from None

    def namespace_pids(self, node: str) -> List[int]:
        out = _run(["ip", "netns", "pids", self.nodes[node].namespace], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: str) -> int:
        """SIGKILL every process in a node's namespace (a node lost); returns how many."""
        pids = self.namespace_pids(node)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def python(self, code: str, timeout: float = 60.0) -> str:
        """Run a Python snippet as a driver on the head node; returns its stdout."""
        cmd = ["ip", "netns", "exec", self.head.namespace, sys.executable, "-c", code]
        env = self.node_env()
        env["RAY_ADDRESS"] = self.gcs_address
        done = _run(cmd, check=False, env=env, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"driver snippet failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def alive_nodes(self) -> List[str]:
        code = ("import ray; ray.init(logging_level='ERROR'); "
                "print(' '.join(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']))")
        return self.python(code).split()

    def stop(self) -> None:
        """Tear everything down by the pids and namespaces this harness made. Idempotent."""
        procs = [node.proc for node in self.nodes.values() if node.proc] + self._procs
        for proc in procs:
            self._kill_group(proc, signal.SIGTERM)
        deadline = time.time() + 20
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.time()))
        for proc in procs:
            self._kill_group(proc, signal.SIGKILL)
        for namespace in list(self._made_namespaces):
            for _ in range(20):  # processes of the namespace (Ray workers re-parented away from our groups)
                pids = [int(p) for p in _run(["ip", "netns", "pids", namespace], check=False).stdout.split()]
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.25)
            _run(["ip", "netns", "del", namespace], check=False)
            self._made_namespaces.remove(namespace)
        for node in self.nodes.values():
            node.proc = None
            shutil.rmtree(node.temp_dir, ignore_errors=True)
        self._procs.clear()
        self._restore_signals()

    # ------------------------------------------------------------ internals

    def make_network(self) -> None:
        """Only the namespaces and the veth pair (start() makes them when missing)."""
        check_can_create()
        self._make_network()

    def _make_network(self) -> None:
        head, worker = self.head, self.nodes["worker"]
        for node in (head, worker):
            done = _run(["ip", "netns", "add", node.namespace], check=False)
            if done.returncode != 0:
                raise ClusterUnavailable(f"`ip netns add {node.namespace}` failed: {done.stderr.strip()}")
            self._made_namespaces.append(node.namespace)
        a, b = f"sapoa{self.tag}"[:15], f"sapob{self.tag}"[:15]
        steps = [["ip", "link", "add", a, "type", "veth", "peer", "name", b],
                 ["ip", "link", "set", a, "netns", head.namespace],
                 ["ip", "link", "set", b, "netns", worker.namespace]]
        for node, link in ((head, a), (worker, b)):
            ns = ["ip", "netns", "exec", node.namespace]
            steps += [[*ns, "ip", "link", "set", link, "name", IFACE],
                      [*ns, "ip", "addr", "add", f"{node.address}/24", "dev", IFACE],
                      [*ns, "ip", "link", "set", IFACE, "up"],
                      [*ns, "ip", "link", "set", "lo", "up"]]
        for step in steps:
            done = _run(step, check=False)
            if done.returncode != 0:
                raise ClusterUnavailable(f"`{' '.join(step)}` failed: {done.stderr.strip()}")

    def _check_port_free(self, node: Node, port: int) -> None:
        code = (f"import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); "
                f"s.bind(('{node.address}', {port}))")
        done = _run(["ip", "netns", "exec", node.namespace, sys.executable, "-c", code], check=False)
        if done.returncode != 0:
            raise ClusterUnavailable(f"port {port} on {node.address} ({node.name} node) is taken: "
                                     f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}; stop "
                                     "whatever holds it (another cluster of this harness?)")

    def _spawn_ray(self, node: Node, args: List[str]) -> subprocess.Popen:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        log = os.path.join(self.workdir, f"ray-{node.name}.log")
        out = open(log, "ab")
        # A worker node gets its own PID namespace too, as on a machine of its own: Ray finds "the local
        # node" of a process that connects by scanning the process table for raylets (and prefers a head
        # it sees), so without it a driver started on the worker node (e.g. vLLM's engine core, which
        # spawns the Ray executor's workers) would take the head for its node.
        own_pids = [] if node.name == "head" else ["unshare", "--pid", "--fork", "--mount-proc"]
        proc = subprocess.Popen(
            ["ip", "netns", "exec", node.namespace, *own_pids, ray, "start", "--node-ip-address", node.address,
             "--temp-dir", node.temp_dir, *args],
            stdout=out, stderr=subprocess.STDOUT, env=self.node_env(), cwd=REPO, start_new_session=True)
        out.close()
        return proc

    def _wait_nodes(self, count: int) -> None:
        deadline = time.time() + self.start_timeout
        last = ""
        while time.time() < deadline:
            for node in self.nodes.values():
                if node.proc is not None and node.proc.poll() is not None:
                    raise ClusterUnavailable(f"`ray start` on the {node.name} node exited with {node.proc.returncode}: "
                                             f"{self._tail(os.path.join(self.workdir, f'ray-{node.name}.log'))}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                alive = self.alive_nodes()
                if len(alive) >= count:
                    return
                last = f"{len(alive)} alive"
            time.sleep(2)
        raise ClusterUnavailable(f"the Ray cluster did not reach {count} nodes in {self.start_timeout:.0f} s ({last}); "
                                 f"logs under {self.workdir}")

    @staticmethod
    def _tail(path: str, lines: int = 15) -> str:
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    @staticmethod
    def _kill_group(proc: subprocess.Popen, sig: int) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)



def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say whether a cluster can be made here")
    parser.add_argument("--workdir", default=os.path.join(REPO, "runs", "cluster"))
    args = parser.parse_args(argv)
    try:
        if args.check:
            check_can_create()
            print("a 2-node Ray cluster can be created here")
            return 0
        with Cluster(args.workdir) as cluster:
            print(f"cluster up: nodes {cluster.alive_nodes()}; tearing down")
        return 0
    except ClusterUnavailable as err:
        print(f"cannot create a cluster: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
