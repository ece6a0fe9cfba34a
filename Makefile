# Set-up and test commands; the README and .ci/run use exactly these.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test bench

setup:  ## fresh virtual environment; torch pinned through constraints.txt (CPU wheel)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"

test:  ## the whole suite (CPU, minutes)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

bench:  ## prefill speed table (README)
	$(BIN)/python benchmarks/prefill_speed.py --layers 8 --repeats 5
