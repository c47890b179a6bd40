# `make test` goes from a fresh Debian 12 machine (root) to a green suite: it builds the
# virtualenv and the test world (Docker engine, compose plugin, stand-in images, sshd
# hosts) and runs unit and end-to-end tests against real hosts.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTBED_DIR ?= /var/tmp/deploy-testbed
export TESTBED_DIR

.PHONY: all test lint unit e2e venv testbed testbed-down testbed-status demo bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m compileall -q deployment > /dev/null
	touch $(STAMP)

venv: $(STAMP)

testbed:
	$(PYTHON) tests/testbed/testbed.py up > /dev/null

testbed-down:
	$(PYTHON) tests/testbed/testbed.py down

testbed-status:
	$(PYTHON) tests/testbed/testbed.py status

# End-to-end tests mostly wait on containers and healthchecks; four workers cut the
# wall time about threefold. Every test has its own project, ports and remote dir.
PYTEST_WORKERS ?= 4

test: venv lint testbed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup

# Lint, format and type checks take seconds; run first, they fail fast before the
# test world is built. mypy checks the package only (tests and bench are untyped).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy deployment

unit: venv
	$(PY) -m pytest tests/unit

e2e: venv testbed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup tests/e2e

# The dev stack on the world's dev host, through the tool, with the inventory the
# testbed writes ($(TESTBED_DIR)/hosts.yaml).
demo: venv testbed
	DEPLOY_HOSTS=$(TESTBED_DIR)/hosts.yaml $(PY) deployment/deploy.py dev up -d --build
	DEPLOY_HOSTS=$(TESTBED_DIR)/hosts.yaml $(PY) deployment/deploy.py dev status

# Benchmarks against plain OpenSSH, Docker over ssh:// and Ansible; never part of `make test`.
bench: venv
	TESTBED_EXTRA_HOSTS=64 $(PYTHON) tests/testbed/testbed.py up > /dev/null
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
