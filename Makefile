# The two set-up commands of the README (`make demo`, `make test`) and a few helpers.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install install-dev demo test lint bench postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# Byte-compile the project's own packages as pip does for installed ones: where
# PYTHONDONTWRITEBYTECODE is set (as on the CI machines) every command would otherwise compile
# them again, ~0.8 s of each command's start-up on 2 cores.
COMPILE := $(BIN)/python -m compileall -q flows tasks model sql

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .
	$(COMPILE)

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(COMPILE)

# Install, then run the main job on the embedded defaults (SQLite + Prefect's local server).
demo: install
	$(BIN)/cxr-screen demo

# PostgreSQL must be up for the tests: start the local cluster when it is not.
postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 || (service postgresql start && sleep 2 && pg_isready -h 127.0.0.1 -p 5432)

# Install everything, then lint and run the whole test suite (SQLite and PostgreSQL).
test: install-dev postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench:
	$(BIN)/python benchmarks/bench_model.py
