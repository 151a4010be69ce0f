# What a newcomer runs: `make demo`, `make test` and `make bench` (each sets itself up).
DEMO_ARGS ?=
STUDY_ARGS ?=
E2E_ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
TESTS ?= tests

.PHONY: install test bench demo study e2e e2e-slurm e2e-multinode docker-test lock clean

install:
	@tools/install_cpu.sh

test: install
	$(PY) -m pytest $(TESTS) $(PYTEST_ARGS)

bench: install
	$(PY) -m openrlhf_sapo.bench

# PPO, GRPO and SAPO on the digits VLM task, 3 seeds; writes runs/demo/report.md. DEMO_ARGS=--quick for a smoke run.
demo: install
	$(PY) -m openrlhf_sapo.demo $(DEMO_ARGS)

# The paper's analyses at small scale: every arm of openrlhf_sapo/demo/study.py on both demo tasks with paired
# seeds; resumable; writes runs/study/report.md. STUDY_ARGS=--quick for a smoke run (CI), --only/--seeds/--task.
study: install
	$(PY) -m openrlhf_sapo.demo.study $(STUDY_ARGS)

# The shipped scripts on a 2-node CPU Ray cluster (two network namespaces; needs root), report in
# runs/e2e/report.md; see tests/cluster/e2e.py.
e2e: install
	$(PY) -m tests.cluster.e2e $(E2E_ARGS)

# examples/scripts/multinode/slurm_sapo.sbatch on a 2-node Slurm cluster in the same namespaces (installs
# Debian's Slurm and munge when missing; needs root); see tests/cluster/slurm.py.
e2e-slurm: install
	$(PY) -m tests.cluster.slurm

# The compose file's CPU services (the image of make docker-test) on an internal network: geo3k/sapo.sh
# submitted from the head container, the worker container killed and the job resumed; see tests/cluster/compose.py.
e2e-multinode: install
	$(PY) -m tests.cluster.compose

# Builds dockerfiles/Dockerfile.cpu here (installing Docker and a local Debian base image when
# missing) and runs the quick demo and a test subset in it; see tools/docker_test.sh.
docker-test:
	@tools/docker_test.sh

lock:
	tools/lock_cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
