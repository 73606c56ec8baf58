# Two commands do everything (see README.md):
#   make compare   set up .venv if needed, then run the chapter's experiment
#   make test      set up .venv if needed, then run the tests
PYTHON ?= python3
VENV ?= .venv
# Pinned so pip takes the CPU wheel on a CPU-only machine instead of a multi-GB CUDA build.
# Override it for another platform, e.g. `make TORCH=torch==2.5.1 test`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.digitlab-installed

.PHONY: setup compare test lint bench clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes: running make twice installs nothing twice.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,tensorboard,serve,onnx,browser,sweep]"
	touch $@

compare: setup
	$(BIN)/digitlab compare mlp cnn

# Two workers (one where there is one core): the suite is mostly single-threaded processes.
test: setup
	$(BIN)/python -m pytest -n auto --maxprocesses 2

# ruff (pyflakes, pycodestyle, isort, bugbear) on everything, mypy on the package; configured in pyproject.toml
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

# Needs the four MNIST .gz files: make bench DIGITLAB_DATA_DIR=../shared/data/mnist
bench: setup
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/side_by_side.py --data-dir "$(DIGITLAB_DATA_DIR)"

clean:
	rm -rf $(VENV) runs
