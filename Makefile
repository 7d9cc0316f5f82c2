# The two commands a new user types: `make run` and `make test`. Both depend on `setup`, which is
# idempotent: each step leaves a stamp and is skipped when its stamp is newer than its inputs.
SHELL := /bin/bash
PY_SYS ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
export WANDB_MODE ?= offline
export WANDB_SILENT ?= true

.PHONY: setup run test test-slow test-all mutants lint format train clean-outputs report wandb-sync gpu-wheels gpu-data

CHROMIUM := /usr/bin/chromium

setup: $(FMNIST) $(CHROMIUM) $(VENV)/.installed

$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	 ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist)) && test -f $@

# Headless Chromium renders the HTML report in its test (tests/test_report.py).
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	(apt-get install -y -qq chromium >/dev/null 2>&1 || \
	 ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium)) && test -x $@

$(VENV)/bin/python:
	$(PY_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch and torchvision first and on their own: this exact pair lies on the machine's disk.
$(VENV)/.torch: | $(VENV)/bin/python
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PIP) install -q -e '.[dev]'
	touch $@

run: setup
	$(PY) -m caap $(ARGS)

# One pytest-xdist worker per core; a test file stays on one worker (its module fixtures are built once).
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m "slow or ddp" $(ARGS)

test-all: setup
	$(PY) -m pytest -q -m "" $(ARGS)

# Mutation check (not part of `make test`): curated single-bug mutants of the core, each applied to a copy
# of src/ and conf/ and run against the tests that should catch it; fails when one survives.
# ARGS="--only dedup-index-only" runs a subset, ARGS="--check" only checks that every snippet is still found.
mutants: setup
	$(PY) scripts/mutants.py $(ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks scripts
	$(VENV)/bin/ruff format src tests benchmarks scripts

train: setup
	$(PY) -m caap.train $(ARGS)

clean-outputs:
	rm -rf outputs/*

# Tables and one HTML page for a run or multirun folder (ARGS="outputs/multirun/<date>/<time>"; default: the
# newest under outputs/), plus an offline W&B summary run.
report: setup
	$(PY) -m caap.report $(ARGS)

# Upload every offline W&B run under outputs/ (job runs and report summary runs). Needs network access and
# WANDB_API_KEY (or `wandb login`). ARGS passes options, e.g. ARGS="--project caap --dry-run".
wandb-sync: setup
	@runs=$$(find outputs -type d -name 'offline-run-*' -not -path '*/files/*' 2>/dev/null | sort); \
	if [ -z "$$runs" ]; then echo "no offline W&B runs under outputs/"; exit 0; fi; \
	if [ -z "$$WANDB_API_KEY" ] && [ ! -f "$$HOME/.netrc" ]; then \
	  echo "wandb-sync: set WANDB_API_KEY (or run wandb login) first"; exit 1; fi; \
	$(VENV)/bin/wandb sync $(ARGS) $$runs

# For a bare CUDA machine (scripts/gpu_check.sh, scripts/gpu_train_fashionscenes.sh): its python3 (CPython 3.12,
# x86-64) has torch, lightning, torchmetrics, safetensors, numpy/scipy/pandas/scikit-image/opencv, rich and
# huggingface_hub, but not the rest of caap's needs. `make gpu-wheels` downloads those as wheels for that Python:
# .whl/ (Hydra, OmegaConf, antlr4 (source only on PyPI: built here), timm, Captum, Quantus) and .whl_wandb/ (W&B
# and what it needs beyond that machine's packages; without it the scripts log to CSV). `make gpu-data` copies
# Fashion-MNIST (Debian's package) to .fmnist/ for the training script. All three are git-ignored: name them in
# the GPU call's carried paths.
GPU_PIP_TARGET := --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
	--platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.0 timm==1.0.31 captum==0.9.0 quantus==0.6.0 cachetools==8.0.3
GPU_WANDB_WHEELS := wandb==0.31.0 cwevals==0.0.1b1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
	typing-inspection==0.4.5 platformdirs==4.14.9 distro==1.9.0 googleapis-common-protos==1.76.0 \
	opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 \
	opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-otlp-proto-http==1.45.2 \
	opentelemetry-exporter-otlp-proto-common==1.45.2 opentelemetry-exporter-http-transport==0.66b2 \
	opentelemetry-exporter-otlp-common==0.66b2

gpu-wheels: | $(VENV)/bin/python
	mkdir -p .whl .whl_wandb
	$(PIP) download -q --no-deps $(GPU_PIP_TARGET) -d .whl $(GPU_WHEELS)
	$(PIP) wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	$(PIP) download -q --no-deps $(GPU_PIP_TARGET) -d .whl_wandb $(GPU_WANDB_WHEELS)
	@du -sh .whl .whl_wandb

gpu-data: $(FMNIST)
	mkdir -p .fmnist && cp $(dir $(FMNIST))*-ubyte.gz .fmnist/
	@du -sh .fmnist
