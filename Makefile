# itera — `make demo` runs the pipeline on the built-in corpus; `make test` runs the suite.
# Both set up .venv/ first. Everything uses the virtual environment's python.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
ITERA   := $(BIN)/itera
STAMP   := $(VENV)/.installed
RUNS    := runs/demo
# pip takes torch's CPU build from local disk when pinned; an unpinned torch pulls a CUDA build.
TORCH   := torch==2.13.0

.PHONY: install demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --upgrade pip
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[test]"
	touch $(STAMP)

demo: install
	ITERA=$(ITERA) RUNS=$(RUNS) bash scripts/demo.sh

test: install
	$(PYTHON) -m pytest -q

lint: install
	$(PYTHON) -m compileall -q itera commands scripts tests

bench: install
	@for b in scripts/bench_*.py; do $(PYTHON) $$b; done

clean:
	rm -rf runs .pytest_cache
