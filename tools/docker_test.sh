#!/usr/bin/env bash
# `make docker-test`: builds dockerfiles/Dockerfile.cpu on this machine, then runs the quick demo and a
# fast subset of the tests inside the image, as its default user (root) and as --user 1000:1000, with
# no network. Sets up what is missing first; every step is idempotent:
#   1. Debian's docker.io and debootstrap (Debian's docker client builds with the daemon's BuildKit;
#      a buildx-less docker CLI may come first on PATH, so this script calls $DOCKER explicitly);
#   2. a Docker daemon: when none answers, one is started here and stopped again at the end;
#   3. the base image: $BASE_IMAGE when given (e.g. python:3.11-slim where a registry is reachable),
#      else a Debian bookworm image made once with debootstrap and kept as $LOCAL_BASE;
#   4. the image $IMAGE, with this machine's pip CA bundle (build secret `pip_ca`) and its local
#      torch CPU wheel (dockerfiles/wheels/) as optional build inputs.
# Environment: DOCKER_TEST_FRESH=1 builds without Docker's layer cache or the pip cache mount (CI);
# DOCKER_TEST_PYTEST (the test subset); DOCKER_TEST_LOGS (default /tmp/openrlhf-sapo-docker-test);
# DOCKER_TEST_BUILD_ONLY=1 stops after the build (make e2e-multinode builds a missing image this way).
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-/usr/bin/docker}
DOCKERD=${DOCKERD:-dockerd}
DOCKERD_FLAGS=${DOCKERD_FLAGS:-}
IMAGE=${IMAGE:-openrlhf-sapo:cpu-test}
LOCAL_BASE=${LOCAL_BASE:-openrlhf-sapo-base:bookworm}
BASE_IMAGE=${BASE_IMAGE:-}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
LOGS=${DOCKER_TEST_LOGS:-/tmp/openrlhf-sapo-docker-test}
PYTEST_SUBSET=${DOCKER_TEST_PYTEST:-tests/test_algo_reference.py tests/test_setup.py tests/test_demo_tasks.py tests/test_warm_start.py}
CONTAINER_PREFIX=openrlhf-sapo-docker-test-$$
mkdir -p "$LOGS"

say() { echo "[docker-test] $*"; }
die() {
  echo "[docker-test] ERROR: $1" >&2
  shift
  for line in "$@"; do echo "[docker-test]   $line" >&2; done
  exit 1
}
elapsed() { echo "$(($(date +%s) - $1)) s"; }

started_dockerd=""
cleanup() {
  local rc=$?
  rm -f dockerfiles/wheels/torch-*.whl
  # Containers this run started (normally removed by --rm; a killed run may leave them).
  if [ -x "$DOCKER" ] && "$DOCKER" info >/dev/null 2>&1; then
    "$DOCKER" ps -aq --filter "name=$CONTAINER_PREFIX" | xargs -r "$DOCKER" rm -f >/dev/null 2>&1 || true
  fi
  if [ -n "$started_dockerd" ]; then
    say "stopping the dockerd this run started (pid $started_dockerd)"
    kill "$started_dockerd" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$started_dockerd" 2>/dev/null || break; sleep 1; done
    kill -9 "$started_dockerd" 2>/dev/null || true
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ----------------------------------------------------------------------------- 1. packages
need_packages=()
[ -x "$DOCKER" ] && command -v "$DOCKERD" >/dev/null || need_packages+=(docker.io)
[ -n "$BASE_IMAGE" ] || command -v debootstrap >/dev/null || need_packages+=(debootstrap)
if [ "${#need_packages[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "missing ${need_packages[*]} and not root, so they cannot be installed here." \
    "Fix: as root, apt-get install -y ${need_packages[*]}; or run make docker-test as root."
  command -v apt-get >/dev/null || die "missing ${need_packages[*]} and this is not a Debian/Ubuntu machine (no apt-get)." \
    "Fix: install Docker (with BuildKit) and debootstrap yourself, or set BASE_IMAGE=python:3.11-slim where a registry is reachable."
  t=$(date +%s)
  say "installing ${need_packages[*]} (apt-get)"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_packages[@]}"; } >"$LOGS/apt.log" 2>&1; then
    die "apt-get install ${need_packages[*]} failed; last lines of $LOGS/apt.log:" "$(tail -5 "$LOGS/apt.log")"
  fi
  say "installed in $(elapsed "$t")"
fi
[ -x "$DOCKER" ] || die "$DOCKER not found after installing docker.io." "Fix: set DOCKER to a docker client with BuildKit (docker buildx or Debian's docker.io)."

# ----------------------------------------------------------------------------- 2. daemon
if ! "$DOCKER" info >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || die "no Docker daemon answers and only root can start one here." \
    "Fix: start dockerd (sudo dockerd &, or systemctl start docker), or add yourself to the docker group."
  say "starting dockerd (log: $LOGS/dockerd.log)"
  # shellcheck disable=SC2086  # DOCKERD_FLAGS is a list of flags
  "$DOCKERD" $DOCKERD_FLAGS >"$LOGS/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    kill -0 "$started_dockerd" 2>/dev/null || break
    sleep 1
  done
  if ! "$DOCKER" info >/dev/null 2>&1; then
    if kill -0 "$started_dockerd" 2>/dev/null; then
      why="dockerd runs but does not answer after 60 s"
    else
      wait "$started_dockerd" && code=0 || code=$?
      why="dockerd exited with status $code"
      started_dockerd=""
    fi
    die "$why; the last lines of its log ($LOGS/dockerd.log):" "$(tail -3 "$LOGS/dockerd.log" | cut -c1-300)" \
      "Fix: dockerd needs root and a kernel that allows it (overlayfs or vfs storage, iptables, cgroups);" \
      "inside an unprivileged container it cannot run. Another dockerd may own /var/run/docker.sock." \
      "Start one yourself and rerun (this script uses a running daemon as it is)."
  fi
  say "dockerd is up"
fi

# ----------------------------------------------------------------------------- 3. base image
if [ -z "$BASE_IMAGE" ]; then
  BASE_IMAGE=$LOCAL_BASE
  if ! "$DOCKER" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    [ "$(id -u)" = 0 ] || die "the base image $LOCAL_BASE is missing and debootstrap needs root." \
      "Fix: run as root once, or set BASE_IMAGE=python:3.11-slim where a registry is reachable."
    t=$(date +%s)
    root=$(mktemp -d /var/tmp/openrlhf-sapo-base.XXXXXX)
    say "building $LOCAL_BASE from Debian bookworm with debootstrap (log: $LOGS/base.log)"
    {
      debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR"
      cp /etc/resolv.conf "$root/etc/resolv.conf"
      chroot "$root" apt-get update
      # What python:3.11-slim has (headers included: DeepSpeed JIT-compiles ops against Python.h),
      # plus what Dockerfile.cpu installs itself (that step stays idempotent).
      DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y --no-install-recommends \
        python3.11 python3.11-dev python3.11-venv python3-pip build-essential libnuma1 git make ca-certificates
      chroot "$root" apt-get clean
      rm -rf "$root"/var/lib/apt/lists/* "$root/etc/resolv.conf"
    } >"$LOGS/base.log" 2>&1 || { rm -rf "$root"; die "building the base image failed; last lines of $LOGS/base.log:" "$(tail -5 "$LOGS/base.log")"; }
    tar -C "$root" -c . | "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["bash"]' - "$LOCAL_BASE" >/dev/null
    rm -rf "$root"
    say "base image $LOCAL_BASE built in $(elapsed "$t")"
  fi
fi

# ----------------------------------------------------------------------------- 4. the image
pip_setting() { python3 -m pip config list 2>/dev/null | sed -n "s/^[^ ]*\.$1='\(.*\)'$/\1/p" | head -1; }
build_args=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
ca=$(pip_setting cert)
if [ -n "$ca" ] && [ -f "$ca" ]; then
  build_args+=(--secret "id=pip_ca,src=$ca")
  say "pip CA bundle for the build: $ca"
fi
rm -f dockerfiles/wheels/torch-*.whl
for dir in $(pip_setting find-links); do
  wheel=$(find "$dir" -maxdepth 1 -name 'torch-2.13.0+cpu-*.whl' 2>/dev/null | head -1)
  if [ -n "$wheel" ]; then
    cp "$wheel" dockerfiles/wheels/
    build_args+=(--build-arg TORCH_CPU_INDEX=)
    say "torch CPU wheel for the build: $wheel"
    break
  fi
done
if [ "${DOCKER_TEST_FRESH:-0}" = 1 ]; then
  build_args+=(--no-cache --build-arg PIP_CACHE=off)
  say "fresh build: no layer cache, no pip cache"
fi
previous=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
t=$(date +%s)
say "building $IMAGE from dockerfiles/Dockerfile.cpu on $BASE_IMAGE (log: $LOGS/build.log)"
DOCKER_BUILDKIT=1 "$DOCKER" build --progress=plain -f dockerfiles/Dockerfile.cpu -t "$IMAGE" "${build_args[@]}" . \
  >"$LOGS/build.log" 2>&1 || die "docker build failed; last lines of $LOGS/build.log:" "$(tail -15 "$LOGS/build.log")"
rm -f dockerfiles/wheels/torch-*.whl
if [ -n "$previous" ] && [ "$previous" != "$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  "$DOCKER" rmi "$previous" >/dev/null 2>&1 || true  # the image this build replaced (5 GB), unless in use
fi
say "image built in $(elapsed "$t") ($("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}'))"

if [ "${DOCKER_TEST_BUILD_ONLY:-0}" = 1 ]; then
  say "DOCKER_TEST_BUILD_ONLY=1: built, nothing run in the image"
  exit 0
fi

# ----------------------------------------------------------------------------- 5. inside the image
in_image() {  # name, then docker run options and command
  local name=$1
  shift
  local t
  t=$(date +%s)
  say "$name ..."
  if ! "$DOCKER" run --rm --name "$CONTAINER_PREFIX-$name" --network none --shm-size 2g "$@" >"$LOGS/$name.log" 2>&1; then
    die "$name failed in the image; last lines of $LOGS/$name.log:" "$(tail -20 "$LOGS/$name.log")"
  fi
  say "$name passed in $(elapsed "$t")"
}
for who in root uid1000; do
  user=()
  [ "$who" = uid1000 ] && user=(--user 1000:1000)
  in_image "demo-quick-$who" "${user[@]}" "$IMAGE" \
    bash -c 'make demo DEMO_ARGS="--quick --out /tmp/demo-quick" && test -s /tmp/demo-quick/report.md'
  in_image "tests-$who" "${user[@]}" "$IMAGE" make test TESTS="$PYTEST_SUBSET" PYTEST_ARGS="-q -p no:cacheprovider"
done
say "all passed (logs in $LOGS)"
