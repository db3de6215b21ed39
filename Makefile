# Set-up, demo and tests on a CPU machine (see README). On GPU clusters install torch for your CUDA first,
# then `pip install -e .` (see docs/install.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU torch pinned in the same command: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0 triton==3.7.1 megatron-core==0.16.1 deepspeed==0.19.8 -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) -m pretrain.demo

lint: setup
	$(PY) -m ruff check .

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider
