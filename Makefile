# vgpud developer entry points. `make run` and `make test` each work on a fresh machine:
# they create .venv and install what they need (Python packages from PyPI; the e2e tier's
# QEMU, guest kernel and busybox are fetched into $(VGPUD_CACHE) by tests/e2e/assets.py,
# never installed system-wide).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VGPUD_CACHE ?= $(HOME)/.cache/vgpud
SOCKET ?= $(or $(XDG_RUNTIME_DIR),/tmp)/vgpud/gpu0.sock
export VGPUD_CACHE

.PHONY: run test lint typecheck unit e2e assets bench bench-guest demo clean

# setup.py compiles the C fast path into the editable install: a change to its sources
# rebuilds it.
$(BIN)/.installed: pyproject.toml setup.py vgpud/server/fast_reads.c \
		vgpud/server/fast_reads.h vgpud/server/fast_reads_build.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# The main job: serve the default device (gh200 profile) on $(SOCKET).
run: $(BIN)/.installed
	$(BIN)/vgpud serve --socket-path $(SOCKET)

lint: $(BIN)/.installed
	$(BIN)/ruff check protocol backends vgpud tests benchmarks
	$(BIN)/ruff format --check protocol backends vgpud tests benchmarks

typecheck: $(BIN)/.installed
	$(BIN)/mypy

# Fast tiers only: protocol, device, variant, daemon over real sockets (no QEMU).
unit: $(BIN)/.installed
	$(BIN)/pytest -m 'not e2e'

# QEMU 11.1 (Debian sid), guest kernels and busybox for both tiers, x86_64 first; idempotent.
# `make assets ASSETS_ARCH="--arch x86_64"` fetches only the x86 tier.
ASSETS_ARCH ?= --all
assets: $(BIN)/.installed
	$(BIN)/python -m tests.e2e.assets fetch $(ASSETS_ARCH)

# VGPUD_E2E_REQUIRE=1: missing assets fail the tier instead of skipping it.
e2e: assets
	VGPUD_E2E_REQUIRE=1 $(BIN)/pytest -m e2e

# Everything CI runs: lint, mypy --strict, every test tier including real QEMU guests
# (VGPUD_E2E_REQUIRE=1: a missing asset fails the run, it is never silently skipped).
test: lint typecheck assets
	VGPUD_E2E_REQUIRE=1 $(BIN)/pytest

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.roundtrip --runs 3

# Accesses seen from inside a TCG guest (boots two; about 2 minutes).
bench-guest: assets
	$(BIN)/python -m benchmarks.guest_bandwidth

demo: assets
	$(BIN)/python -m tests.e2e.demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
