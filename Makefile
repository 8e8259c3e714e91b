# `make run` runs the demo, `make test` runs the whole suite; both set up .venv on a fresh machine.
# TORCH=auto (default) installs torch's CUDA build where `nvidia-smi` runs and its CPU build
# elsewhere; TORCH=cpu or TORCH=cuda forces one, TORCH=keep leaves the environment's torch alone
# (scripts/install-torch.sh says exactly what each does).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.idla-installed
TORCH ?= auto
TORCH_VERSION := 2.13.0

.PHONY: run test lint setup clean FORCE

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, the chosen build, so nothing below pulls another one.
	PY=$(PY) TORCH=$(TORCH) TORCH_VERSION=$(TORCH_VERSION) sh scripts/install-torch.sh
	$(PY) -m pip install -q -e '.[dev,flower]'
	touch $(STAMP)

ifeq ($(origin TORCH),command line)
$(STAMP): FORCE  # a TORCH= given to make installs again, even over a finished setup
endif
FORCE:

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
