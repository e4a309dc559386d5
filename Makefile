# The two set-up commands of the README (`make demo`, `make test`) and a few helpers.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: install install-dev demo test lint bench postgres system-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# Byte-compile the project's own packages as pip does for installed ones: where
# PYTHONDONTWRITEBYTECODE is set (as on the CI machines) every command would otherwise compile
# them again, ~0.8 s of each command's start-up on 2 cores.
COMPILE := $(BIN)/python -m compileall -q cli web flows tasks model sql

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

# The real peers the tests talk to, from Debian, installed when missing: a PACS (Orthanc with
# its DICOMweb plugin), dcmtk (storescu, findscu, encoders), dicom3tools (dciodvfy) and a
# headless Chromium for the review page's browser tests.
SYSTEM_BINARIES := /usr/sbin/Orthanc /usr/share/orthanc/plugins/libOrthancDicomWeb.so /usr/bin/storescu /usr/bin/dciodvfy /usr/bin/chromium-headless-shell
system-deps:
	@missing=0; for f in $(SYSTEM_BINARIES); do [ -e $$f ] || missing=1; done; \
	if [ $$missing = 1 ]; then \
	  echo "installing the test peers from Debian (orthanc, orthanc-dicomweb, dcmtk, dicom3tools, chromium-headless-shell)"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
	    orthanc orthanc-dicomweb dcmtk dicom3tools chromium-headless-shell; \
	fi

# Install everything, then lint and run the whole test suite (SQLite and PostgreSQL).
test: install-dev postgres system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports

bench:
	$(BIN)/python benchmarks/bench_model.py
