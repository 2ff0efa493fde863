# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Installed first, pinned. Its build is pip's choice: a CPU wheel where pip is pointed at one (find-links,
# PyTorch's CPU index), else PyPI's, the CUDA build. TORCH=<wheel file or requirement> installs another.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# Test processes (pytest-xdist): CI has 2 cores, and most of a test's time is single-threaded Python (imports,
# subprocess start-up, tiny models), so two processes share them better than one.
TEST_WORKERS ?= 2

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# setuptools leaves build metadata in the tree; a stale copy there would shadow the
	# installed entry points (the adapter registry) for `python -m` run from this folder.
	rm -rf mmpeft.egg-info
	touch $@

demo: $(STAMP)
	$(BIN)/python -m mmpeft fit --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=20

clean:
	rm -rf .cache runs lightning_logs
