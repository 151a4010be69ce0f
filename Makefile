# The two commands a newcomer needs: `make test` and `make bench` (each sets itself up).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install test bench lock clean

install:
	@tools/install_cpu.sh

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

bench: install
	$(PY) -m openrlhf_sapo.bench

lock:
	tools/lock_cpu.sh

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
