# tryage: `make serve` to run the service, `make test` to run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LIBRARY ?= libraries/demo/library.yaml
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev install-loadtest serve demo test lint format clean loadtest

# torch is installed first, pinned, so pip takes the CPU build and not several GB of CUDA wheels.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[dev]"
	touch $@ $(VENV)/.installed

$(VENV)/.installed-loadtest: pyproject.toml | $(BIN)/python
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[loadtest]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-loadtest: $(VENV)/.installed-loadtest

# The demo library: built offline the first time (10-20 minutes on 2 cores; resumable), cached after.
libraries/demo/library.yaml: | $(VENV)/.installed
	$(BIN)/tryage demo build --out libraries/demo

demo: install
	$(BIN)/tryage demo build --out libraries/demo

# The smoke library (random experts): `make serve LIBRARY=libraries/smoke/library.yaml`.
libraries/smoke/library.yaml: | $(VENV)/.installed
	$(BIN)/tryage smoke-library libraries/smoke

serve: install $(LIBRARY)
	$(BIN)/tryage serve --library $(LIBRARY) --host $(HOST) --port $(PORT)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

# Short load test (at most 5 minutes) against a library it serves itself (the smoke library;
# another with `python -m loadtest --library FILE`): writes loadtest/results/latest/.
loadtest: install-loadtest
	$(BIN)/python -m loadtest --profile short

clean:
	rm -rf $(VENV) libraries/smoke libraries/demo .pytest_cache .ruff_cache
