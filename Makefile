# The targets the README, CI and people use.
#   make run    a gateway and a worker, a demo bot on the echo model, a demo key printed
#   make test   the test suite (installs what it needs, starts Redis and RabbitMQ if down)
#   make lint   ruff and mypy
#   make deploy-check   render and validate the Kubernetes manifests offline
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := tests/node/node_modules/.package-lock.json

.PHONY: run test lint format check services browser bench bench-quick deploy-check clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "botline needs Python 3.11 or newer"'
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

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

# The side-by-side benchmark: direct, botline, LiteLLM (installed into bench/.venv-litellm).
bench: $(STAMP) services
	$(BIN)/python -m bench

bench-quick: $(STAMP) services
	$(BIN)/python -m bench --quick

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
