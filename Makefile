# vlgate: `make run` serves, `make test` tests. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python

.PHONY: install dev run generate test lint bench clean demo faults

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	# The project itself, editable, for the `vlgate` command ($(BIN)/vlgate); --no-deps: torch stays as pinned.
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed requirements-dev.txt
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

## Serve everything on one host: Redis (found or started), SQLite + migrations, one worker per GPU (or one on
## the CPU), the web on :8501; a process that dies is restarted with backoff.
run: install
	$(PY) scripts/run_local.py $(RUN_ARGS)

## One-shot generation on the command line, no services needed.
generate: install
	$(PY) -m worker.cli generate --prompt "$${PROMPT:-Describe this image.}" $${IMAGE:+--image "$$IMAGE"}

test: dev
	scripts/ensure_services.sh
	scripts/ensure_browser.sh
	$(PY) -m pytest $(PYTEST_ARGS)

## The fault proof at length: kill -9, Redis restarts, dropped database connections, a web killed mid-upload.
faults: dev
	scripts/ensure_services.sh
	VLGATE_FAULT_SCALE=$${VLGATE_FAULT_SCALE:-5} $(PY) -m pytest -q -s tests/test_faults.py
	$(PY) -m pytest -q -s -m soak tests/

lint: dev
	$(BIN)/ruff check .

bench: dev
	$(PY) -m bench.engine
	$(PY) -m bench.engine --shape mid
	$(PY) -m bench.service --shape both
	$(PY) -m bench.stream
	$(PY) -m bench.streams
	$(PY) -m bench.batching --shape both
	$(PY) -m bench.constrained
	$(PY) -m bench.batch_api
	$(PY) -m bench.caches
	$(PY) -m bench.peer
	$(PY) -m bench.prepare

demo: install
	$(PY) -m worker.cli build-demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
