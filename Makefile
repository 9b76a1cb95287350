# geomjobs: `make demo` and `make test` each set up their own environment (.venv) first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow test-fast lint demo bench bench-peer notebooks reward-demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Two pytest-xdist workers (the CI machine has 2 cores); TEST_WORKERS=0 runs the suite serially.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q tests -n $(TEST_WORKERS) --dist loadgroup

test-slow: setup
	$(PY) -m pytest -q tests -m slow

lint: setup
	$(PY) -m ruff check geomjobs tests benchmarks examples notebooks

demo: setup
	$(PY) -m geomjobs.demo --out out/demo

bench: setup
	$(PY) benchmarks/bench.py --out BENCHMARKS.md

# geomjobs' psi against the same estimator written in PyTorch (torch.func.vjp + vmap + svdvals), side by
# side in one interleaved run, written into BENCHMARKS.md. Not part of `make test` or CI. The peer runs in
# its own environment, .venv-peer: pip install torch pulls ~5.5 GB of CUDA wheels (the CPU is all it uses);
# nothing else is downloaded at run time (random or shipped weights, no hub access).
PEER_VENV  ?= .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

$(PEER_STAMP):
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEER_VENV)/bin/python -m pip install --quiet torch "diffusers<0.40" safetensors numpy
	touch $(PEER_STAMP)

# BENCH_PEER_ARGS: more arguments (e.g. --rounds 3 --cases mlp conv; --smoke for a check in seconds)
BENCH_PEER_ARGS ?=
bench-peer: setup $(PEER_STAMP)
	$(PY) benchmarks/bench_peer.py --peer-python $(PEER_VENV)/bin/python --bf16 --out BENCHMARKS.md $(BENCH_PEER_ARGS)

# every notebook at full size; figures and verdicts.json under out/notebooks/ (the suite runs each at its
# small defaults); the findings table docs/findings.md is generated from the verdicts
notebooks: setup
	$(PY) -m geomjobs.analysis.run_notebooks --full --out out/notebooks --findings docs/findings.md

# reward data -> train -> guided sampling at scales 0, 1, 2, 4 -> descriptors -> evaluate -> PNG
reward-demo: setup
	$(PY) examples/reward_digits.py --out out/reward-demo

clean:
	rm -rf out .pytest_cache
