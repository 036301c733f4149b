# itera — `make demo` runs the pipeline on the built-in corpus; `make test` runs the suite.
# Both set up .venv/ first. Everything uses the virtual environment's python.

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
ITERA   := $(BIN)/itera
# llama-cpp-python is built for the CPU it runs on (scripts/install_native.py): a wheel built
# elsewhere may use instructions this CPU lacks. The stamp names this CPU, so moving the checkout
# (or its .venv) to another CPU reinstalls.
CPU_KEY := $(shell $(PY) scripts/install_native.py --key)
STAMP   := $(VENV)/.installed-$(CPU_KEY)
RUNS    := runs/demo
# Every dependency, test tools included, at the exact version (and sha256) in the lock file: what CI
# tests is what make install gives (llama-cpp-python from the sdist the lock pins, built per CPU).
# torch is the CPU build pip takes from local disk (2.13.0+cpu); an unpinned torch pulls a CUDA build.
# `make lock` refreshes the lock (see docs/development.md).
LOCK    := requirements/lock.txt
PIP     := pip==26.3

.PHONY: install lock demo test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK) scripts/install_native.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet "$(PIP)"
	$(PYTHON) scripts/install_native.py --lock $(LOCK) --python $(PYTHON)
	$(PYTHON) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# pip-tools in a throwaway environment resolves pyproject.toml's ranges (with the test extras) and
# requirements/torch.in anew, with the hash of every file each pinned version may install from.
lock:
	rm -rf .lock-venv && $(PY) -m venv .lock-venv && .lock-venv/bin/pip install --quiet "$(PIP)" pip-tools
	.lock-venv/bin/pip-compile --upgrade --extra test --generate-hashes --allow-unsafe --strip-extras \
	  --no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml requirements/torch.in
	rm -rf .lock-venv

demo: install
	ITERA=$(ITERA) PY=$(PYTHON) RUNS=$(RUNS) bash scripts/demo.sh

# The tests run in a worker process (pytest-xdist, one worker): a native crash (a segfault in a
# runtime) fails the test it happened in, a new worker takes the rest, and the summary names it.
test: install
	$(PYTHON) -m pytest -q -p xdist -n 1

lint: install
	$(PYTHON) -m compileall -q itera scripts tests

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
