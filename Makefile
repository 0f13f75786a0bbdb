# Every target does its own set-up: a fresh clone needs only python3 (3.11+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/hello/syncworker.toml

.PHONY: help install run test lint typecheck check clean

help:
	@echo "make run        start a worker on a throwaway embedded PostgreSQL with the example job"
	@echo "make test       lint, type-check and run the whole test suite (own PostgreSQL)"
	@echo "make lint       ruff"
	@echo "make typecheck  mypy --strict"

$(BIN)/syncworker: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(BIN)/syncworker

run: install
	PYTHONPATH=examples/hello $(BIN)/syncworker run --config $(CONFIG) --embedded

lint: install
	$(BIN)/ruff check syncworker tests examples
	$(BIN)/ruff format --check syncworker tests examples

typecheck: install
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
