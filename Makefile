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

# Each scripts/bench_NAME.py prints one JSON object: kept as runs/bench/NAME.json (written only when
# the script succeeds) and printed. `make bench BENCHES=scripts/bench_startup.py` runs a subset.
# A script that cannot run here (bench_runtimes without runs/demo/teacher) says why on stderr; the
# others still run, and the target fails at the end naming every script that left no JSON.
BENCH_OUT := runs/bench
BENCHES   ?= $(sort $(wildcard scripts/bench_*.py))

bench: install
	@mkdir -p $(BENCH_OUT); failed=""; \
	for b in $(BENCHES); do \
	  name=$$(basename $$b .py); name=$${name#bench_}; out=$(BENCH_OUT)/$$name.json; \
	  echo "== $(PYTHON) $$b > $$out" >&2; \
	  if $(PYTHON) $$b > $$out.tmp; then mv $$out.tmp $$out; cat $$out; \
	  else rm -f $$out.tmp; failed="$$failed $$b"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "no JSON from:$$failed" >&2; exit 1; fi

clean:
	rm -rf runs .pytest_cache
