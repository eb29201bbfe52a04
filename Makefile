# Two commands a new user needs: `make demo` (the main job) and `make test`.
#
# Dependencies come from requirements/lock.txt (the tested versions) and live in a virtual
# environment cached under $(CACHE_DIR), keyed by a hash of the lock and the Python version, so CI
# and every clone on this machine reuse it. The cache holds dependencies only: each clone gets its
# own small .venv that sees the cached packages through a .pth file and has *this* checkout
# installed editable, so two clones never run each other's code.

PYTHON ?= python3
LOCK := requirements/lock.txt
CACHE_DIR ?= $(HOME)/.cache/partialize
LOCK_HASH := $(shell $(PYTHON) .ci/lock_hash.py $(LOCK))
DEPS := $(CACHE_DIR)/deps-$(LOCK_HASH)
LATEST := $(CACHE_DIR)/deps-latest
VENV := .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: deps venv demo test test-latest lock bench coverage lint clean help

help:
	@echo "make demo        - the main job: convert resnet50 with recipes/resnet50-patconv.yaml (see README)"
	@echo "make test        - the test suite (fast, CPU), against the locked versions"
	@echo "make test-latest - the test suite against the newest releases (not cached by the lock)"
	@echo "make lock        - rewrite $(LOCK) from the newest releases (then run make test)"
	@echo "make bench       - benchmarks: operators, Table 4 recipes, slow tests (pytest -m slow)"
	@echo "make coverage    - model-zoo sweep (pytest -m coverage, writes docs/coverage.md)"
	@echo "make lint        - ruff"

# the cached dependencies, installed exactly from the lock (no resolution, then a consistency check)
deps:
	@if [ ! -f "$(DEPS)/.complete" ]; then \
	  echo ">> creating $(DEPS) from $(LOCK) (first run only: torch is about 5 GB)"; \
	  rm -rf "$(DEPS)" && mkdir -p "$(CACHE_DIR)" && \
	  $(PYTHON) -m venv "$(DEPS)" && \
	  "$(DEPS)/bin/pip" install $(PIP_FLAGS) --no-deps -r $(LOCK) && \
	  "$(DEPS)/bin/pip" check && \
	  touch "$(DEPS)/.complete"; \
	fi

# this clone's environment: cached dependencies + this checkout, editable
venv: deps
	@$(PYTHON) .ci/clone_venv.py "$(VENV)" "$(DEPS)"

demo: venv
	$(BIN)/partialize convert resnet50 --recipe recipes/resnet50-patconv.yaml --out out/resnet50-patconv.safetensors --force

test: venv
	$(BIN)/python -m pytest -q

# newest releases of everything pyproject.toml allows; a separate cache and a separate clone venv
test-latest:
	@if [ ! -x "$(LATEST)/bin/python" ]; then $(PYTHON) -m venv "$(LATEST)"; fi
	"$(LATEST)/bin/pip" install $(PIP_FLAGS) --upgrade --upgrade-strategy eager pip setuptools wheel
	"$(LATEST)/bin/pip" install $(PIP_FLAGS) --upgrade --upgrade-strategy eager ".[dev]"
	"$(LATEST)/bin/pip" uninstall $(PIP_FLAGS) -y partialize
	@$(PYTHON) .ci/clone_venv.py .venv-latest "$(LATEST)"
	"$(LATEST)/bin/pip" list 2>/dev/null | grep -iE "^(torch|torchvision|timm|torch-pruning|onnx|onnxruntime) "
	.venv-latest/bin/python -m pytest -q

lock:
	rm -rf "$(CACHE_DIR)/lock-build" && $(PYTHON) -m venv "$(CACHE_DIR)/lock-build"
	"$(CACHE_DIR)/lock-build/bin/pip" install $(PIP_FLAGS) --upgrade pip setuptools wheel
	"$(CACHE_DIR)/lock-build/bin/pip" install $(PIP_FLAGS) ".[dev]"
	"$(CACHE_DIR)/lock-build/bin/pip" uninstall $(PIP_FLAGS) -y partialize
	$(PYTHON) .ci/write_lock.py "$(CACHE_DIR)/lock-build" $(LOCK)
	rm -rf "$(CACHE_DIR)/lock-build"

bench: venv
	$(BIN)/partialize bench ops --threads 1 --md docs/bench_ops.md --force
	$(BIN)/python examples/bench_table4.py --threads 1 --md docs/bench_table4.md
	$(BIN)/python -m pytest -q -m slow

coverage: venv
	$(BIN)/python -m pytest -q -m coverage

lint: venv
	$(BIN)/python -m ruff check partialize tests examples
	$(BIN)/python -m ruff format --check partialize tests examples

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info .pytest_cache
