# Two commands do all set-up on a fresh machine:
#   make run   — create .venv, install, start `broker dev` (OpenBao dev, SQLite, dev issuer)
#   make test  — create .venv, install, lint, build the image twice (as root), run the whole
#                suite on real OpenBao + PostgreSQL
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Three stamps: the installers (bootstrap); `make run`'s service and its dev OpenBao;
# `make test`'s test-only packages on top (real clients for the engines' stories, moto,
# the linters, the supply-chain tools).
RUN_STAMP  := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
BOOT_STAMP := $(VENV)/.installed-bootstrap
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check
DEV_ARGS ?=

.PHONY: install install-test run test lint bench clean lock sbom image image-tools images \
	sign-image verify-image pin-image test-image

# Every package comes from a hash-locked file (requirements/*.txt, written by `make lock`):
# pip refuses anything the lock does not name with its hash. Wheels only: building a
# source distribution would fetch its build dependencies without hashes (pip does not
# check those). The broker itself is installed from this tree without build isolation, so
# its build needs nothing but the locked setuptools.
LOCKED := $(PIP) --require-hashes --only-binary :all: -r
SELF   := $(PIP) --no-deps --no-build-isolation -e .

$(BOOT_STAMP): requirements/bootstrap.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(LOCKED) requirements/bootstrap.txt
	touch $(BOOT_STAMP)

# --no-compile: byte-compiling every installed module (botocore, SQLAlchemy...) was a fifth
# of a cold `make install`'s CPU (8 s of 39 s measured); Python compiles what `broker dev`
# imports (about 3 s) on its first start. `make test` compiles everything (its many
# subprocesses would otherwise each pay it where PYTHONDONTWRITEBYTECODE is set).
$(RUN_STAMP): pyproject.toml requirements/dev.txt $(BOOT_STAMP)
	$(LOCKED) requirements/dev.txt --no-compile
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

# The whole suite, the image's tests included: the image is built twice first (the
# reproducibility test compares the two), about two minutes.
test: install-test lint images
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The image's tests alone (what `make test` runs after building the images).
test-image: install-test images
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/image tests/unit/test_locks.py \
		tests/unit/test_sbom.py

# A CycloneDX SBOM of the runtime environment: build/sbom/sbom.cdx.json.
sbom: install-test
	$(BIN)/python -m scripts.sbom --out build/sbom

# buildah, podman (with runc: crun refuses this machine's hybrid cgroups), skopeo,
# debootstrap and gpg, from Debian's packages, where missing.
IMAGE_TOOLS := buildah podman skopeo debootstrap runc gpg
image-tools:
	@missing=$$(for t in $(IMAGE_TOOLS); do command -v $$t >/dev/null || echo $$t; done; \
		test -f /usr/share/keyrings/debian-archive-keyring.gpg || echo keyring); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing from Debian's packages"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			buildah podman skopeo debootstrap runc gnupg debian-archive-keyring >/dev/null; \
	fi

# The image (build/image/image.oci.tar, its digest in build/image/image.json, its SBOM);
# `images` builds it twice, the second into build/image-again, for the reproducibility test.
IMAGE_OUT ?= build/image
image: install-test image-tools
	$(BIN)/python -m scripts.image build --out $(IMAGE_OUT)

# As root only (debootstrap, buildah's vfs store): elsewhere the image's tests skip, and
# fail in CI (BROKER_TESTS_REQUIRE_SERVICES=1), whose machines run as root.
images: install-test
	@if [ "$$(id -u)" != 0 ]; then echo "images: not root, not built (the image tests skip)"; \
		rm -f build/image/image.json build/image-again/image.json; \
	else $(MAKE) --no-print-directory image-tools && \
		$(BIN)/python -m scripts.image build --out build/image && \
		$(BIN)/python -m scripts.image build --out build/image-again; fi

# Sign with a GPG key: make sign-image GNUPGHOME=DIR KEY=FINGERPRINT (a throwaway key:
# .venv/bin/python -m scripts.image keygen --home DIR). Writes the signed copy, the signed
# provenance and the key's public half under IMAGE_OUT.
sign-image: install-test
	$(BIN)/python -m scripts.image sign --out $(IMAGE_OUT) --home $(GNUPGHOME) --key $(KEY)

# make verify-image PUBKEY=KEY.asc [COMMIT=REV]: the signature under a policy requiring
# that key, the provenance, the SBOM against the image, for an image built from COMMIT
# (default HEAD). The key is the verifier's own copy of the signer's, never one from beside
# the image.
COMMIT ?= HEAD
verify-image: install-test
	$(BIN)/python -m scripts.image verify --out $(IMAGE_OUT) --pubkey $(PUBKEY) \
		--commit $(COMMIT)

# deploy/ references the image built into IMAGE_OUT by its digest.
pin-image: install-test
	$(BIN)/python -m scripts.image pin --out $(IMAGE_OUT)

bench: install-test
	$(BIN)/python bench/identity.py
	$(BIN)/python bench/exchange.py
	$(BIN)/python bench/audit.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/revocation.py
	$(BIN)/python bench/agent.py
	$(BIN)/python bench/bulk.py

# Re-resolve the locks from pyproject.toml (and requirements/*.in) with uv: universal
# (every platform's markers, Python 3.11 on), every file's hash. runtime.txt is the
# service (the image's), dev.txt adds `broker dev`'s OpenBao (make run), test.txt the tests'
# packages; each wider lock keeps the narrower one's versions, the SBOM tool's the tests'.
UV_COMPILE := $(BIN)/uv pip compile --quiet --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock"
lock: install-test
	$(UV_COMPILE) requirements/bootstrap.in -o requirements/bootstrap.txt
	$(UV_COMPILE) pyproject.toml -o requirements/runtime.txt
	$(UV_COMPILE) pyproject.toml --extra dev -c requirements/runtime.txt -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml --extra test -c requirements/dev.txt -o requirements/test.txt
	$(UV_COMPILE) requirements/sbom.in -c requirements/test.txt -o requirements/sbom.txt

clean:
	rm -rf $(VENV) .broker-dev .pytest_cache build
