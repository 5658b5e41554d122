# One entry point for humans and CI. `make test` sets up .venv (pinned by constraints.txt) when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench-rerank serve-demo stress audit

DEMO_GALLERY ?= data/demo-gallery
DEMO_INDEX ?= indexes/demo
PORT ?= 8000

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,ray]"
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
	@test -f $(DEMO_GALLERY)/manifest.jsonl || $(BIN)/python -m training.synthetic --out $(DEMO_GALLERY) \
		--seed 1 --train 0 --val 0 --test 1000
	@test -L $(DEMO_INDEX)/current || $(BIN)/python -m index_builder build --model models/demo \
		--gallery $(DEMO_GALLERY)/manifest.jsonl --out $(DEMO_INDEX)
	@echo "HAT Search demo: http://127.0.0.1:$(PORT)/  (Ctrl-C stops it)"
	HAT_INDEX_ROOT=$(DEMO_INDEX) HAT_MODEL=models/demo HAT_PORT=$(PORT) $(BIN)/python -m service

# The reliability suite at full size (docs/reliability.md): fuzzing (> 1,000 requests), hostile requests, load
# (8 and 32 clients, 60 s per endpoint, 10,000 requests for memory), five publishes under load, kill -9 of the
# builder at five random points, corrupted indexes, the security checklist, then the dependency audit. Figures
# go to stress-report/ (one JSON file per test). `make test` runs the same tests at their short sizes.
RELIABILITY_TESTS = tests/service/test_fuzz.py tests/service/test_hostile.py tests/service/test_load.py \
	tests/service/test_reload_stress.py tests/service/test_corruption.py tests/service/test_security.py \
	tests/service/test_decoder_fuzz.py \
	tests/index_builder/test_crash.py tests/index_builder/test_gallery_escape.py tests/model/test_untrusted_pickles.py

stress: install
	rm -rf stress-report
	HAT_STRESS=full $(BIN)/python -m pytest $(RELIABILITY_TESTS) -s
	$(MAKE) audit

# pip-audit lives in a venv of its own (its dependencies are not the project's); tools/audit.py falls back to
# PyPI's project JSON for the pins pip-audit cannot look up, and says which pins stay unaudited.
audit: install
	@test -x .venv-audit/bin/pip-audit || ($(PYTHON) -m venv .venv-audit && .venv-audit/bin/pip install -q pip-audit==2.10.1)
	mkdir -p stress-report
	$(BIN)/python tools/audit.py --pip-audit .venv-audit/bin/pip-audit --gpu --json stress-report/audit.json
