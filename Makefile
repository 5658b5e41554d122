# One entry point for humans and CI. `make test` sets up .venv (pinned by constraints.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench-rerank

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,train]"
	touch $@

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench-rerank: install
	$(BIN)/python benchmarks/rerank.py
