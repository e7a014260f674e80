# maild — `make run` starts the daemon, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint bench clean browser-deps

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## start maild on 127.0.0.1:2525 with config.example.toml and the default rules
	$(BIN)/maild serve --config config.example.toml

test: $(STAMP)  ## the whole suite (PostgreSQL tests too when MAILD_TEST_DATABASE_URL is set)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)  ## measured, never asserted: docs/benchmarks.md (PostgreSQL rows with MAILD_BENCH_DATABASE_URL)
	$(BIN)/python -m bench $(BENCH_ARGS)

browser-deps:  ## Debian's chromium and chromedriver, for the console's browser tests (as root)
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver

lint: $(STAMP)
	$(BIN)/ruff check maild tests bench
	$(BIN)/ruff format --check maild tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis data
