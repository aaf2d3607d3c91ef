# Two commands do all set-up on a fresh machine:
#   make run   — create .venv, install, start `broker dev` (OpenBao dev, SQLite, dev issuer)
#   make test  — create .venv, install, lint, run the whole suite on real OpenBao + PostgreSQL
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEV_ARGS ?=

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/broker dev $(DEV_ARGS)

lint: install
	$(BIN)/ruff check broker tests bench migrations

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: install
	$(BIN)/python bench/identity.py
	$(BIN)/python bench/exchange.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/revocation.py

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache
