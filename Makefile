# driftline — the two commands: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test test-unit lint venv system-deps lock clean bench

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel -c $(CONSTRAINTS)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

## The main job on the embedded default (no external services).
demo: $(STAMP)
	$(VENV)/bin/driftline demo

## The whole suite: lint, types, unit and integration tests against real Kafka/Redis/Prometheus.
test: $(STAMP) system-deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

## Only what runs without services.
test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/mypy

## Debian packages and Kafka jars the local services need (skipped when endpoints are given).
system-deps:
	bash scripts/install-system-deps.sh

## Re-pin after changing dependencies: existing pins are kept, new packages get pinned.
## (`make lock UPGRADE=1` re-resolves everything to the newest versions.)
lock:
	rm -rf .cache/lockvenv && $(PYTHON) -m venv .cache/lockvenv
	.cache/lockvenv/bin/pip install -q $(if $(UPGRADE),,-c $(CONSTRAINTS)) -e '.[dev]'
	.cache/lockvenv/bin/pip freeze --exclude-editable | grep -v '^-e' > $(CONSTRAINTS)

bench: $(STAMP)
	$(PY) -m load_tests.bench_detectors

clean:
	rm -rf $(VENV) .cache/lockvenv .pytest_cache .mypy_cache .ruff_cache
