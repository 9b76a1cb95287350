# geomjobs: `make demo` and `make test` each set up their own environment (.venv) first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow test-fast lint demo bench notebooks reward-demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

test-slow: setup
	$(PY) -m pytest -q tests -m slow

lint: setup
	$(PY) -m ruff check geomjobs tests benchmarks examples notebooks

demo: setup
	$(PY) -m geomjobs.demo --out out/demo

bench: setup
	$(PY) benchmarks/bench.py --out BENCHMARKS.md

# every notebook at full size; figures and verdicts.json under out/notebooks/ (the suite runs each at its
# small defaults); the findings table docs/findings.md is generated from the verdicts
notebooks: setup
	$(PY) -m geomjobs.analysis.run_notebooks --full --out out/notebooks --findings docs/findings.md

# reward data -> train -> guided sampling at scales 0, 1, 2, 4 -> descriptors -> evaluate -> PNG
reward-demo: setup
	$(PY) examples/reward_digits.py --out out/reward-demo

clean:
	rm -rf out .pytest_cache
