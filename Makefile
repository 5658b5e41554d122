# One entry point for humans and CI. `make test` sets up .venv (pinned by constraints.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench-rerank serve-demo

DEMO_GALLERY ?= data/demo-gallery
DEMO_INDEX ?= indexes/demo
PORT ?= 8000

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest

bench-rerank: install
	$(BIN)/python benchmarks/rerank.py

# One command serves the bundled demo: environment, a generated 1,000-scene gallery (seed 1; the demo model
# never saw it) and its index are made when missing, then the service runs in the foreground.
serve-demo: install
	@test -f $(DEMO_GALLERY)/manifest.jsonl || $(BIN)/python -m model.synthetic --out $(DEMO_GALLERY) \
		--seed 1 --train 0 --val 0 --test 1000
	@test -L $(DEMO_INDEX)/current || $(BIN)/python -m index_builder build --model models/demo \
		--gallery $(DEMO_GALLERY)/manifest.jsonl --out $(DEMO_INDEX)
	@echo "HAT Search demo: http://127.0.0.1:$(PORT)/  (Ctrl-C stops it)"
	HAT_INDEX_ROOT=$(DEMO_INDEX) HAT_MODEL=models/demo HAT_PORT=$(PORT) $(BIN)/python -m service
