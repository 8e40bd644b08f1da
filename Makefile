# Two commands on a fresh machine: `make train` and `make test`. Both create .venv if missing
# and install the project into it (once; re-installed when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: help install train test test-fast test-e2e mutants lint format clean

help:
	@echo "make train ARGS='norm=none trainer.max_epochs=3'   train (sets up .venv first)"
	@echo "make test                                        run the whole test suite"
	@echo "make test-fast                                   in-process tests only, one worker per core"
	@echo "make test-e2e                                    the end-to-end tier: train.py runs, DDP, sweeps"
	@echo "make mutants MUTMUT_ARGS='\"normlab.data.*\"'          mutation testing (mutmut) of the key modules, fast tier"
	@echo "make lint / make format                          ruff"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/python train.py $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	NORMLAB_FAST_TIER=1 $(BIN)/python -m pytest -m "not e2e and not slow" -n auto $(PYTEST_ARGS)

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m "e2e or slow" $(PYTEST_ARGS)

# mutation testing (docs/development.md): not part of CI; results stay in mutants/ and
# `mutmut results` / `mutmut show NAME` read them; a re-run only retests what changed
MUTANTS_STAMP := $(VENV)/.installed-mutants
$(MUTANTS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,mutants]"
	touch $(MUTANTS_STAMP)

mutants: $(MUTANTS_STAMP)
	NORMLAB_FAST_TIER=1 $(BIN)/mutmut run $(MUTMUT_ARGS)
	$(BIN)/mutmut results

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:
	rm -rf logs/*/ .pytest_cache .ruff_cache mutants
