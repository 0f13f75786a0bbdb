# Every target does its own set-up: a fresh clone needs only python3 (3.11+).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= examples/hello/syncworker.toml
# The benchmark's own venv: procrastinate and the profilers never become
# dependencies of syncworker.
BENCH_VENV ?= .venv-bench
BENCH_BIN  := $(BENCH_VENV)/bin
QUICK      ?=

.PHONY: help install run test test-unit test-tools soak lint typecheck check clean bench bench-install

help:
	@echo "make run        start a worker on a throwaway embedded PostgreSQL with the example job"
	@echo "make test       lint, type-check and run the whole test suite (own PostgreSQL)"
	@echo "make test-unit  the unit tests alone (tests/unit: no database, seconds)"
	@echo "make soak       3 workers, 50 triggers/s, random kill -9 and restarts for 10 min (SYNCWORKER_SOAK_SECONDS)"
	@echo "make bench      latency, idle cost, cron, bursts, scale-out, fail-over vs procrastinate (~6 min; QUICK=1: ~1 min)"
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
	$(BIN)/ruff check syncworker tests examples bench
	$(BIN)/ruff format --check syncworker tests examples bench

typecheck: install
	$(BIN)/mypy

# Tools the tests run for real, from Debian's packages: libfaketime (workers
# with a skewed clock), PgBouncer (poolers), and Chromium with its driver
# (the dashboard's tests in tests/browser). Installed once; needs root, as
# CI has.
TEST_PACKAGES := faketime pgbouncer chromium chromium-driver
test-tools:
	@if ! command -v faketime >/dev/null || ! test -x /usr/sbin/pgbouncer \
		|| ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
		apt-get install -y -q $(TEST_PACKAGES) >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q $(TEST_PACKAGES) >/dev/null); \
	fi

test: lint typecheck test-tools
	$(BIN)/pytest

# The unit tests alone: no database, no daemons, seconds.
test-unit: install
	$(BIN)/pytest tests/unit -q

# Not part of `make test`: ten minutes of chaos, then the invariants.
soak: install
	$(BIN)/pytest -m soak -s --timeout=3600 tests/soak/test_soak.py

$(BENCH_BIN)/procrastinate: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_BIN)/pip install --quiet --upgrade pip
	$(BENCH_BIN)/pip install --quiet -e '.[embedded]' procrastinate psutil py-spy
	@touch $@

bench-install: $(BENCH_BIN)/procrastinate

# Not part of `make test`: real workers on their own PostgreSQL (or
# $$SYNCWORKER_BENCH_DATABASE_URL); prints the table, writes bench/results/latest.json.
bench: bench-install
	$(BENCH_BIN)/python -m bench.run $(if $(QUICK),--quick)

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
