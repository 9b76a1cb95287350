"""chunk: auto fits the cotangent sweep to memory by XLA's own memory plan, before any sample."""
import logging

import numpy as np
import pytest

from geomjobs.runner.engine import Engine, memory_budget
from geomjobs.runner.plan import plan_job

from jobs import mlp_spec, write_mlp

K = 200
D = 256          # d >= k: W A is formed from k VJPs (with d < k it would be d JVPs, geometry/spectrum.py)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A ReLU MLP 256 -> 512 -> 512 -> 256: every VJP row carries 512-wide cotangents, so the
    k = 200 rows of one pass need several MB more than a few rows at a time."""
    return write_mlp(tmp_path_factory.mktemp("wide"), sizes=(D, 512, 512, 256))


def engine(weights, chunk="auto"):
    spec = mlp_spec(weights, count=8, batch_size=8, local_scaling={"mode": "projection", "k": K, "chunk": chunk}, local_rank={})
    spec["latents"]["shape"] = [D]
    e = Engine(plan_job(spec))
    assert e.describe().get("side") == "vjp"
    return e


def test_cpu_default_is_one_pass_when_it_fits(wide, monkeypatch):
    monkeypatch.setenv("GEOMJOBS_MEMORY_BUDGET_GIB", "64")
    assert memory_budget() == 64 * 2**30
    e = engine(wide)
    assert e.chunk is None and 0 < e.memory_bytes < memory_budget() and e.compiled_count() == 1


def test_a_tight_budget_halves_the_chunk_until_the_plan_fits(wide, monkeypatch):
    monkeypatch.setenv("GEOMJOBS_MEMORY_BUDGET_GIB", "64")
    full = engine(wide)
    need_small = engine(wide, chunk=4).memory_bytes
    assert need_small < full.memory_bytes    # XLA's plan shrinks with the chunk (else nothing to fit)
    budget = (need_small + full.memory_bytes) / 2
    monkeypatch.setenv("GEOMJOBS_MEMORY_BUDGET_GIB", str(budget / 2**30))
    fit = engine(wide)
    assert fit.chunk is not None and fit.chunk < K and fit.memory_bytes <= budget
    z = np.random.default_rng(0).standard_normal((8, D))
    ref, _ = full.compute(z)
    got, errors = fit.compute(z)
    assert errors == [None] * 8
    # the same rows of W A, pushed through in chunks: equal up to float32 summation order
    np.testing.assert_allclose(got["local_scaling"], ref["local_scaling"], rtol=1e-5)
    np.testing.assert_allclose(got["singular_values"], ref["singular_values"], rtol=1e-5, atol=1e-6)


def test_an_impossible_budget_runs_one_row_at_a_time_and_says_so(wide, monkeypatch, caplog):
    monkeypatch.setenv("GEOMJOBS_MEMORY_BUDGET_GIB", "1e-6")
    with caplog.at_level(logging.WARNING, logger="geomjobs.runner.engine"):
        e = engine(wide)
    assert e.chunk == 1
    assert "even chunk 1 needs" in caplog.text and "budget" in caplog.text
    res, errors = e.compute(np.ones((3, D)))
    assert errors == [None] * 3 and np.isfinite(res["local_scaling"]).all()


def test_an_explicit_chunk_is_never_changed(wide, monkeypatch):
    monkeypatch.setenv("GEOMJOBS_MEMORY_BUDGET_GIB", "1e-6")
    e = engine(wide, chunk=50)
    assert e.chunk == 50 and e.memory_bytes > memory_budget() and e.compiled_count() == 1
