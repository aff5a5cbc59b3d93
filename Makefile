# Two entry points: `make demo` and `make test`. Both create .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# torch is pinned: these wheels are on this machine's disk; any other version downloads GBs.
TORCH   := torch==2.14.1 torchvision==0.29.1
# DeepSpeed's JIT-built CPU ops are cached per checkout (see tests/conftest.py).
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test test-heavy test-fast lint setup slurm-deps clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# Debian's slurm-wlm + munge for the SLURM tests (a real one-node cluster is started by the tests).
slurm-deps:
	bash slurm/install-deps.sh

demo: $(STAMP)
	$(BIN)/compt-scale demo --out runs/demo

# ruff; the layers contract (pyproject [tool.importlinter]); mypy on the package ([tool.mypy]).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy

# The suite without the heavy tier (< 30 min on 2 cores); CI (.ci/run) then runs the heavy tier too.
test: $(STAMP) slurm-deps
	$(BIN)/python -m pytest -q --durations=15 -m "not heavy" tests

test-heavy: $(STAMP) slurm-deps
	$(BIN)/python -m pytest -q --durations=15 -m heavy tests

# The fast tier (< 2 min): no multi-process, SLURM or slow tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not slurm and not dist" tests

bench: $(STAMP)
	$(BIN)/python benchmarks/grow.py

clean:
	rm -rf runs .pytest_cache
