# dgss — `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= dev,sweep,slurm
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE := 1
PYTEST_FLAGS ?= -q -p no:cacheprovider

.DEFAULT_GOAL := help
.PHONY: help install pretrain demo test test-all lint format bench bench-gpu gpu-pack docs clean

help: ## show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(BIN)/dgss-train: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/dgss-train ## create .venv with torch 2.14.1 + torchvision 0.29.1, then dgss and its extras (editable)

TOY_WEIGHTS ?= weights/toy_mim.safetensors

$(TOY_WEIGHTS): scripts/pretrain_toy.py | $(BIN)/dgss-train
	$(BIN)/python scripts/pretrain_toy.py --out $@

pretrain: $(TOY_WEIGHTS) ## pretrain the demo's toy ViT without labels (cached in weights/; ~3 min on 2 cores)

demo: install $(TOY_WEIGHTS) ## FisherTune from the pretrained toy ViT on the embedded domains (CPU, < 10 min incl. pretraining)
	$(BIN)/dgss-train experiment=demo backbone.weights=$(TOY_WEIGHTS) hydra.run.dir=logs/demo

test: install ## the default test suite (no slow tests; < 10 min on 2 cores)
	$(BIN)/python -m pytest $(PYTEST_FLAGS) -m "not slow"

test-all: install ## every test, slow ones included (subprocess CLI, sweeps)
	$(BIN)/python -m pytest $(PYTEST_FLAGS)

lint: install ## ruff lint + format check
	$(BIN)/ruff check dgss tests scripts
	$(BIN)/ruff format --check dgss tests scripts

format: install ## ruff autofix + format
	$(BIN)/ruff check --fix dgss tests scripts
	$(BIN)/ruff format dgss tests scripts

bench: install ## step overhead (Rein, FisherTune vs full fine-tuning), every method incl. SoMA, loader throughput; rows in docs/benchmarks.md
	$(BIN)/python scripts/bench_step.py
	$(BIN)/python scripts/bench_rein.py
	$(BIN)/python scripts/bench_fishertune.py
	$(BIN)/python scripts/benchmark.py
	$(BIN)/python scripts/bench_loader.py

# On a CUDA machine: python3 there if this tree has no .venv (an offline GPU image; see docs/benchmarks.md)
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
OUT ?= bench-gpu-out

bench-gpu: ## on a CUDA machine: every method's step, the CLI end to end, slide inference (< 8 min; OUT=folder)
	$(GPU_PYTHON) scripts/gpu_env.py bench $(OUT) $(BENCH_GPU_ARGS)

gpu-pack: install ## here, with internet: wheels an offline GPU image lacks -> .gpu/ (carry it with the tree)
	$(BIN)/python scripts/gpu_env.py pack

docs: install ## build the documentation site from docs/ into site/ (mkdocs-material; fails on a broken link)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict

docs-images: install ## re-render the synthetic-domain sample grid for docs/datasets.md
	$(BIN)/python scripts/render_synthetic.py

clean: ## remove run outputs and caches (keeps .venv)
	rm -rf logs outputs multirun wandb site .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -not -path "./$(VENV)/*" -prune -exec rm -rf {} +
