# The two commands of README.md: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfm-installed
PYTEST_ARGS ?=

.PHONY: venv test lint format demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/make_venv.sh
	PYTHON=$(PYTHON) bash scripts/make_venv.sh $(VENV)
	@touch $@

## make test: create .venv, install the pinned dependencies, run the whole CPU suite (ruff and import-linter included)
test: venv
	bash scripts/run_tests.sh $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check dfm tests examples
	$(VENV)/bin/ruff format --check dfm tests examples
	$(VENV)/bin/lint-imports

format: venv
	$(VENV)/bin/ruff format dfm tests examples
	$(VENV)/bin/ruff check --fix dfm tests examples

## make demo: train the default recipe on synthetic videos, then generate samples
demo: venv
	bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache runs/demo
