# The two commands a newcomer needs: `make demo` and `make test`. Everything else is a step of those.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv demo test test-unit lint lock crd cluster-build clean

venv:
	scripts/setup-env

demo: venv
	scripts/demo

cluster-build:
	@if [ -x tests/cluster/build ]; then tests/cluster/build; fi

test: venv cluster-build
	$(PY) -m ruff check .
	$(PY) -m pytest tests

test-unit: venv
	$(PY) -m pytest tests/unit

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Re-resolve every Python dependency (uv.lock) and re-export the image requirement files from it.
lock:
	scripts/uv lock --upgrade
	scripts/lock-image-requirements

crd: venv
	$(VENV)/bin/llavarun crd > crds/llavarun.yaml
	cp crds/llavarun.yaml charts/llavarun-operator/files/crds/llavarun.yaml
	$(VENV)/bin/llavarun crd --reference > docs/CONFIGURATION.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
