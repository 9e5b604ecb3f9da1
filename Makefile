# Every target sets itself up on a fresh clone: .venv, the package with its test extra, and (as root) the
# Debian packages the test suite needs (a real one-node SLURM cluster: slurm-wlm, munge; nginx for remote data).
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
# (pip's "WARNING: Location ... is ignored" lines, one per package the local index lacks, are filtered out)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
LINT_PATHS := pipeline shards tests bench

.PHONY: setup sysdeps lint test test-fast demo demo-compare demo-ablation bench clean

setup: $(STAMP)

# (re)installs when pyproject.toml or this recipe changes. The editable install is a plain path .pth line to the
# project root (pyproject.toml: package-dir), so no `shards/` or `pipeline/` folder in the user's cwd can shadow it.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null 2>&1 || true
	# torch / torchvision first, pinned to the releases that install from local disk on the CI machines
	{ $(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q torch torchvision; } \
	  2>&1 | { grep -v "^WARNING: Location" || true; }
	$(BIN)/pip install -q -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	touch $(STAMP)

sysdeps:
	@if [ "$$(id -u)" = "0" ] && ! command -v slurmctld >/dev/null 2>&1; then \
	  echo "installing slurm-wlm and munge (for the SLURM tests)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; } || \
	  echo "warning: could not install slurm-wlm / munge; the SLURM tests will be skipped"; \
	fi
	@if [ "$$(id -u)" = "0" ] && ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then \
	  echo "installing nginx (the HTTP server of the remote-storage tests)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q nginx >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q nginx >/dev/null; } || \
	  echo "warning: could not install nginx; the HTTP tests of tests/test_remote.py will be skipped"; \
	fi

# ruff reads its settings from pyproject.toml ([tool.ruff]); lint only, the code is not reformatted
lint: setup
	$(BIN)/ruff check $(LINT_PATHS)

# a lint error fails the target before any test runs
test: setup sysdeps
	$(BIN)/ruff check $(LINT_PATHS)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pipeline.demo $(DEMO_ARGS)

demo-compare: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pipeline.demo --compare $(DEMO_ARGS)

# the paper's ablation (4 arms x 3 seeds, each pretrained and fine-tuned; about an hour on 2 CPU cores);
# e.g. DEMO_ARGS='--seeds 1 --steps 30' for a quick look
demo-ablation: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pipeline.demo --ablation $(DEMO_ARGS)

bench: setup
	DS_ACCELERATOR=cpu $(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
