# `make demo`: set up and run the whole pipeline on the embedded demo data.
# `make test`: set up and run the whole test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := configs/demo.yaml

.PHONY: setup demo test test-fast lint bench clean-demo

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m pipeline.demo --config $(DEMO)

test: setup
	$(BIN)/python -m pytest -m "slow or not slow" --timeout=900 -q

test-fast: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff format --check pipeline tests benchmarks
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_rle.py

clean-demo:
	rm -rf data/demo runs/demo
