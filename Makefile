# `make run` runs the demo, `make test` runs the whole suite; both set up .venv on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idla-installed

.PHONY: run test lint setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# The CPU wheel of torch first, so nothing below pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,flower]'
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/idla train

lint: setup
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
