"""`make docker-test` (tools/docker_test.sh) where Docker cannot run: one clear message saying why
and what to do, in seconds, instead of a stack of Docker errors. (The real build and the runs in
the image are `make docker-test` itself, which CI runs after `make test`.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "docker_test.sh"


request_cleanup = []


@pytest.fixture(autouse=True)
def _remove_copies():
    yield
    while request_cleanup:
        shutil.rmtree(request_cleanup.pop(), ignore_errors=True)


def _run(tmp_path, env_extra, user=None):
    # A world-readable copy: a checkout under `mktemp -d` is 0700 and another user could not read it.
    root = Path(tempfile.mkdtemp(prefix="docker-test-script-"))
    request_cleanup.append(root)
    (root / "tools").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "tools" / "docker_test.sh")
    for path in (root, root / "tools"):
        path.chmod(0o755)
    logs = root / "logs"
    logs.mkdir(mode=0o777)
    logs.chmod(0o777)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "DOCKER_TEST_LOGS": str(logs),
           # a client that reaches no daemon; a base given, so nothing needs debootstrap
           "DOCKER": "/bin/false", "BASE_IMAGE": "python:3.11-slim", **env_extra}
    cmd = ["bash", str(root / "tools" / "docker_test.sh")]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    return proc, time.time() - t0


def _fake_dockerd(tmp_path, text, code):
    fake = Path(tempfile.mkdtemp(prefix="fake-dockerd-")) / "dockerd"
    fake.parent.chmod(0o755)
    request_cleanup.append(fake.parent)
    fake.write_text(f"#!/bin/sh\necho '{text}' >&2\nexit {code}\n")
    fake.chmod(0o755)
    return str(fake)


@pytest.mark.skipif(os.geteuid() != 0, reason="starts dockerd, which needs root")
def test_a_dockerd_that_exits_is_reported_with_its_reason(tmp_path):
    reason = 'failed to start daemon: error initializing graphdriver: driver not supported: overlay2'
    proc, seconds = _run(tmp_path, {"DOCKERD": _fake_dockerd(tmp_path, reason, 1)})
    assert proc.returncode == 1
    assert "ERROR: dockerd exited with status 1" in proc.stderr
    assert reason in proc.stderr and "Fix: dockerd needs root" in proc.stderr
    assert "Traceback" not in proc.stderr and seconds < 30


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("dockerd"), reason="needs root and Debian's docker.io")
def test_the_real_dockerd_failing_to_start_is_reported(tmp_path):
    proc, seconds = _run(tmp_path, {"DOCKERD_FLAGS": f"--config-file {tmp_path}/missing.json"})
    assert proc.returncode == 1
    assert "ERROR: dockerd exited with status" in proc.stderr
    assert "missing.json" in proc.stderr  # dockerd's own words, from its log
    assert seconds < 30


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="switches to another user")
def test_without_a_daemon_and_without_root(tmp_path):
    proc, _ = _run(tmp_path, {"DOCKERD": _fake_dockerd(tmp_path, "never run", 1)}, user=65534)
    assert proc.returncode == 1
    assert "no Docker daemon answers and only root can start one" in proc.stderr
    assert "Fix: start dockerd" in proc.stderr
    assert "never run" not in proc.stderr
