# Two commands do all set-up on a fresh machine:
#   make run   — create .venv, install, start `broker dev` (OpenBao dev, SQLite, dev issuer)
#   make test  — create .venv, install, lint, run the whole suite on real OpenBao + PostgreSQL
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Two stamps: `make run` installs the service alone; `make test` adds the test-only
# packages (real clients for the engines' stories, moto, the linters).
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEV_ARGS ?=

.PHONY: install install-test run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip

# --no-compile: byte-compiling every installed module (botocore, SQLAlchemy...) was a fifth
# of a cold `make install`'s CPU (8 s of 39 s measured); Python compiles what `broker dev`
# imports (about 3 s) on its first start. `make test` compiles everything (its many
# subprocesses would otherwise each pay it where PYTHONDONTWRITEBYTECODE is set).
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) --no-compile -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(PIP) -e '.[test]'
	-$(BIN)/python -m compileall -qq -j0 $(VENV)/lib
	touch $(RUN_STAMP) $(TEST_STAMP)

install: $(RUN_STAMP)

install-test: $(TEST_STAMP)

run: install
	$(BIN)/broker dev $(DEV_ARGS)

# ruff; the architecture contracts (import-linter); mypy --strict over broker/; the size
# and environment rules that import-linter cannot express.
lint: install-test
	$(BIN)/ruff check broker tests bench migrations scripts
	$(BIN)/lint-imports
	$(BIN)/mypy broker
	$(BIN)/python scripts/check_shape.py broker

test: install-test lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install-test
	$(BIN)/python bench/identity.py
	$(BIN)/python bench/exchange.py
	$(BIN)/python bench/audit.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/revocation.py
	$(BIN)/python bench/agent.py
	$(BIN)/python bench/bulk.py

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache
