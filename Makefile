# Two commands a new user needs: `make demo` (the main job) and `make test`.
# Each creates/reuses a virtual environment: dependencies live in a cached venv keyed by a hash of
# pyproject.toml's dependency lists (so CI and every clone on this machine reuse it), and .venv
# links to it; the package itself is installed editable from this checkout on every run.

PYTHON ?= python3
CACHE_DIR ?= $(HOME)/.cache/partialize
DEPS_HASH := $(shell $(PYTHON) .ci/deps_hash.py)
VENV_CACHE := $(CACHE_DIR)/venv-$(DEPS_HASH)
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: venv demo test bench bench-ops coverage lint clean help

help:
	@echo "make demo   - the main job (see README)"
	@echo "make test   - the test suite (fast, CPU)"
	@echo "make bench  - benchmarks: operators, Table 4 recipes, slow tests (pytest -m slow)"
	@echo "make coverage - model-zoo sweep of the default recipe (writes docs/coverage.md)"
	@echo "make lint   - ruff"

venv:
	@if [ ! -f "$(VENV_CACHE)/.complete" ]; then \
	  echo ">> creating $(VENV_CACHE) (first run only: downloads torch, ~5 GB)"; \
	  rm -rf "$(VENV_CACHE)" && mkdir -p "$(CACHE_DIR)" && \
	  $(PYTHON) -m venv "$(VENV_CACHE)" && \
	  "$(VENV_CACHE)/bin/pip" install $(PIP_FLAGS) --upgrade pip setuptools wheel && \
	  "$(VENV_CACHE)/bin/pip" install $(PIP_FLAGS) torch torchvision && \
	  "$(VENV_CACHE)/bin/pip" install $(PIP_FLAGS) -e ".[dev]" && \
	  touch "$(VENV_CACHE)/.complete"; \
	fi
	@if [ -e "$(VENV)" ] && [ ! -L "$(VENV)" ]; then \
	  echo "error: $(VENV) exists and is not partialize's link; move it away (or run with VENV=...)"; exit 1; fi
	@if [ "$$(readlink $(VENV))" != "$(VENV_CACHE)" ]; then rm -f "$(VENV)"; ln -s "$(VENV_CACHE)" "$(VENV)"; fi
	@$(BIN)/pip install $(PIP_FLAGS) --no-deps --no-build-isolation -e . >/dev/null

demo: venv
	$(BIN)/partialize convert resnet50 --recipe recipes/resnet50-patconv.yaml --out out/resnet50-patconv.safetensors --force

test: venv
	$(BIN)/python -m pytest -q

bench: venv
	$(BIN)/partialize bench ops --threads 1 --md docs/bench_ops.md
	$(BIN)/python examples/bench_table4.py --threads 1 --md docs/bench_table4.md
	$(BIN)/python -m pytest -q -m slow

coverage: venv
	$(BIN)/python -m pytest -q -m coverage

lint: venv
	$(BIN)/ruff check partialize tests examples
	$(BIN)/ruff format --check partialize tests examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
