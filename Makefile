# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format typecheck mypy bench clean all

all: lint typecheck test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,postgres]'
	touch $(STAMP)

install: $(STAMP)

# The main job on sample events: 100,000 widget events (and a few bad lines)
# through the embedded Redis into SQLite, then what landed.
run: $(STAMP)
	rm -f widgets.db
	$(BIN)/python configs/generate_events.py 100000 1000 1 5000 \
	  | $(BIN)/phonon run -c configs/widgets.toml --dead-letter .phonon/dead-letter.jsonl
	$(BIN)/python configs/show.py widgets.db widgets

# Branch coverage of the in-process tests (worker subprocesses are not measured).
test: $(STAMP)
	$(BIN)/pytest --cov --cov-report=term $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check phonon_cli tests
	$(BIN)/ruff format --check phonon_cli tests

format: $(STAMP)
	$(BIN)/ruff format phonon_cli tests
	$(BIN)/ruff check --fix phonon_cli tests

typecheck mypy: $(STAMP)
	$(BIN)/mypy phonon_cli

clean:
	-test -x $(BIN)/python && $(BIN)/python -c \
	  "from phonon_cli.store.connection import EmbeddedServer; EmbeddedServer('.phonon').stop()"
	rm -rf $(VENV) .phonon .coverage .coverage.* widgets.db custom.db sessions.db build *.egg-info .pytest_cache .mypy_cache .ruff_cache
