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
BOOT_STAMP := $(VENV)/.installed-bootstrap
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEV_ARGS ?=

.PHONY: install install-test run test lint bench clean lock

# Every package comes from a hash-locked file (requirements/*.txt, written by `make lock`):
# pip refuses anything the lock does not name with its hash. The broker itself is
# installed from this tree without build isolation, so its build needs nothing but the
# locked setuptools.
LOCKED := $(PIP) --require-hashes -r
SELF   := $(PIP) --no-deps --no-build-isolation -e .

$(BOOT_STAMP): requirements/bootstrap.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(LOCKED) requirements/bootstrap.txt
	touch $(BOOT_STAMP)

# --no-compile: byte-compiling every installed module (botocore, SQLAlchemy...) was a fifth
# of a cold `make install`'s CPU (8 s of 39 s measured); Python compiles what `broker dev`
# imports (about 3 s) on its first start. `make test` compiles everything (its many
# subprocesses would otherwise each pay it where PYTHONDONTWRITEBYTECODE is set).
$(RUN_STAMP): pyproject.toml requirements/runtime.txt $(BOOT_STAMP)
	$(LOCKED) requirements/runtime.txt --no-compile
	$(SELF) --no-compile
	touch $(RUN_STAMP)

$(TEST_STAMP): pyproject.toml requirements/test.txt $(BOOT_STAMP)
	$(LOCKED) requirements/test.txt
	$(SELF)
	-$(BIN)/python -m compileall -qq -j0 $(VENV)/lib
	touch $(RUN_STAMP) $(TEST_STAMP)

install: $(RUN_STAMP)

install-test: $(TEST_STAMP)

run: install
	$(BIN)/broker dev $(DEV_ARGS)

# ruff; the architecture contracts (import-linter); mypy --strict over broker/; the size
# and environment rules that import-linter cannot express.
lint: install-test
	$(BIN)/ruff check broker tests bench scripts
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

# Re-resolve the locks from pyproject.toml (and requirements/*.in) with uv: universal
# (every platform's markers, Python 3.11 on), every file's hash; the test lock keeps the
# runtime lock's versions, the SBOM tool's lock the test lock's.
UV_COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock"
lock: install-test
	$(UV_COMPILE) requirements/bootstrap.in -o requirements/bootstrap.txt
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.txt
	$(UV_COMPILE) pyproject.toml --extra test -c requirements/runtime.txt -o requirements/test.txt
	$(UV_COMPILE) requirements/sbom.in -c requirements/test.txt -o requirements/sbom.txt

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache
