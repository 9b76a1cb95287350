# geomjobs: `make demo` and `make test` each set up their own environment (.venv) first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-slow: setup
	GEOMJOBS_SLOW=1 $(PY) -m pytest -q tests -m slow

lint: setup
	$(PY) -m ruff check geomjobs tests benchmarks examples

demo: setup
	$(PY) -m geomjobs.demo --out out/demo

bench: setup
	$(PY) benchmarks/bench.py --out BENCHMARKS.md

clean:
	rm -rf out .pytest_cache
