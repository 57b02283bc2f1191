# The two commands of README.md: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dfm-installed
PYTEST_ARGS ?=

.PHONY: venv test test-avx2 test-scalar lint format demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt scripts/make_venv.sh
	PYTHON=$(PYTHON) bash scripts/make_venv.sh $(VENV)
	@touch $@

## make test: create .venv, install the pinned dependencies, run the whole CPU suite (ruff and import-linter included)
test: venv
	bash scripts/run_tests.sh $(PYTEST_ARGS)

## make test-avx2: the same suite on the AVX2 kernels of torch, MKL and oneDNN (as on a CPU without AVX-512, e.g. AMD
## EPYC before Zen 4), so that a tolerance tuned on this machine's kernels fails here rather than on someone else's
test-avx2: venv
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 bash scripts/run_tests.sh $(PYTEST_ARGS)

## make test-scalar: the suite on unvectorised kernels (as on a CPU without AVX2), which round differently again; without
## the slow tests (the default recipe's training test takes ~15 minutes there, over pytest's 600 s timeout)
test-scalar: venv
	ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 \
	  bash scripts/run_tests.sh -m "not slow" $(PYTEST_ARGS)

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
