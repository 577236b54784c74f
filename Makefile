# The targets the README, CI and people use.
#   make run    a gateway and a worker, a demo bot on the echo model, a demo key printed
#   make test   the test suite (installs what it needs, starts Redis and RabbitMQ if down)
#   make lint   ruff and mypy
#   make lock   refresh requirements.lock and requirements-dev.lock
#   make deploy-check   render and validate the Kubernetes manifests offline
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.package-lock.json

.PHONY: run test lint format check services browser bench bench-quick bench-instructions bench-timeline deploy-check clean lock

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "botline needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)

# Every package pinned, with hashes, from the lock; then botline itself, without
# letting pip pick anything else.
$(STAMP): pyproject.toml requirements-dev.lock | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# Refresh the locks from pyproject.toml's floors: requirements-dev.lock (runtime and
# the dev extras: make, CI) and requirements.lock (runtime only, the same versions:
# the Dockerfile). Linux, CPython 3.11, like the image.
PIP_COMPILE := $(BIN)/pip-compile --quiet --generate-hashes --strip-extras --allow-unsafe \
	--no-emit-index-url --no-emit-find-links --upgrade
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet pip-tools
	$(PIP_COMPILE) --extra dev --output-file requirements-dev.lock pyproject.toml
	$(PIP_COMPILE) --constraint requirements-dev.lock --output-file requirements.lock pyproject.toml

# The Node client tests drive /openai/v1 with the official npm package.
$(NODE_STAMP): tests/node/package-lock.json
	@command -v npm >/dev/null || { echo "make test needs Node.js >= 20 and npm (apt-get install nodejs npm)" >&2; exit 1; }
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

services:
	@scripts/ensure-services

browser:
	@scripts/ensure-chromium

run: $(STAMP) services
	$(BIN)/botline demo

test: $(STAMP) $(NODE_STAMP) services browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Render deploy/k8s's overlays and validate every object offline (no cluster, no kubectl).
deploy-check: $(STAMP)
	$(BIN)/python -m tests.support.deploycheck

# The side-by-side benchmark: direct, botline (at the defaults `make run` uses), LiteLLM
# (installed into bench/.venv-litellm). Options: .venv/bin/python -m bench --help.
bench: $(STAMP) services
	$(BIN)/python -m bench

bench-quick: $(STAMP) services
	$(BIN)/python -m bench --quick
	@scripts/ensure-valgrind
	$(BIN)/python -m bench.instructions --requests 30 --rounds 1

# Instructions per whole answer, gateway and worker, under callgrind: the figure that
# does not move with the machine's load. REV=<commit> counts a build of it beside.
bench-instructions: $(STAMP) services
	@scripts/ensure-valgrind
	$(BIN)/python -m bench.instructions $(if $(REV),--baseline-commit $(REV)) $(if $(C),--concurrency $(C) --requests 3000)

# Where a lone whole answer's time goes, step by step, in the gateway and the worker.
bench-timeline: $(STAMP) services
	$(BIN)/python -m bench.timeline

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
