# airflow-reindex — two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKEND ?= local
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help venv native browser demo test test-fast airflow airflow-celery status lint lock db-stop clean bench

help:
	@echo "make demo     set up everything and run reindex_corpus on the bundled sample corpus (BACKEND=local)"
	@echo "make test     set up if needed and run every test (unit, integration, DAG, end-to-end, browser)"
	@echo "make browser  install Debian's chromium for the browser test if /usr/bin/chromium is missing (root)"
	@echo "make airflow  start Airflow (standalone) on the embedded database: UI at http://localhost:8080"
	@echo "              BACKEND=vertex also starts the GCS + Vertex emulators and points the Google path at them"
	@echo "make airflow-celery  the same with the CeleryExecutor: api-server, scheduler, dag-processor, triggerer and"
	@echo "              two Celery workers (broker: PostgreSQL, or REINDEX_CELERY_BROKER=redis://...); docs/scale-out.md"
	@echo "make status   python -m reindex status --corpus sample"
	@echo "make lint     ruff"
	@echo "make db-stop  stop the embedded PostgreSQL under .data/pg"

# The venv is (re)built when the pins change. torch==2.13.0 resolves to the local CPU wheel.
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	mkdir -p .data
	touch $(STAMP)

venv: $(STAMP)

# The native result parser (include/reindex/native/vecparse.c, loaded with ctypes): built for its exact
# source, a no-op when already built. Without a C compiler the project runs on its simdjson path.
native: $(STAMP)
	$(BIN)/python -m reindex.native --optional

# The browser test (tests/e2e/test_browser.py) drives Debian's chromium through the pip playwright package's
# driver; Playwright's own browser downloads are never used. Installed once, as root; a no-op when present.
CHROMIUM := /usr/bin/chromium
browser:
	@if [ -x $(CHROMIUM) ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
	  echo "make browser: $(CHROMIUM) is missing and installing it needs root:" >&2; \
	  echo "  sudo apt-get install -y --no-install-recommends chromium   (Debian), or run make as root" >&2; \
	  exit 1; \
	fi; \
	apt-get update -qq && apt-get install -y --no-install-recommends chromium && test -x $(CHROMIUM)

demo: native
	$(BIN)/python scripts/demo.py --backend $(BACKEND)

test: native browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: native
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Benchmark suite (benchmarks/README.md); e.g. make bench BENCH_ARGS="--only ingest --rss-lines 1000000"
BENCH_ARGS ?=
bench: native
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Airflow standalone on the embedded database (scripts/devenv.py). BACKEND=vertex also starts the GCS and
# Vertex emulators on GCS_PORT / VERTEX_PORT, points the vertex backend and google_cloud_default at them,
# and stops them when Airflow stops (README "Vertex from Airflow").
GCS_PORT ?= 9023
VERTEX_PORT ?= 8790
airflow: native
	$(BIN)/python scripts/devenv.py airflow --backend $(BACKEND) --gcs-port $(GCS_PORT) --vertex-port $(VERTEX_PORT)

# CeleryExecutor on one host, no Docker (scripts/celery_stack.py, docs/scale-out.md): api-server, scheduler,
# dag-processor, triggerer and CELERY_WORKERS workers on the embedded database; the broker is Celery's SQLAlchemy
# transport on it unless REINDEX_CELERY_BROKER (e.g. redis://localhost:6379/0) is set. Ctrl-C stops it all.
CELERY_WORKERS ?= 2
CELERY_ARGS ?=
airflow-celery: native
	$(BIN)/python scripts/devenv.py airflow --backend $(BACKEND) --gcs-port $(GCS_PORT) --vertex-port $(VERTEX_PORT) \
	  -- $(BIN)/python scripts/celery_stack.py --workers $(CELERY_WORKERS) $(CELERY_ARGS)

status: $(STAMP)
	$(BIN)/python -m reindex status --corpus sample

lint: $(STAMP)
	$(BIN)/ruff check .

lock: $(STAMP)
	( echo "# Full lock of the environment made by \`make venv\` (pip freeze). Regenerate with \`make lock\`."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e' | sed 's/^torch==\(.*\)+cpu/torch==\1/' ) > constraints.txt

db-stop:
	-$(BIN)/python scripts/devenv.py stop

clean: db-stop
	rm -rf .data $(VENV)
