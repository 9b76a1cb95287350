"""The per-sample step as a pure function of the plan, and the engine that compiles it once.

The step is checked against the exact references (dense Jacobian + numpy SVD, brute-force sign
counts) with no Dataset, driver or Ray involved; the engine's single compile is checked through
JAX's public monitoring events (every XLA backend compile reports one)."""
import contextlib

import jax
import jax.monitoring
import numpy as np

from geomjobs.generators.mlp import load_mlp_weights
from geomjobs.runner.engine import Engine
from geomjobs.runner.plan import plan_job
from geomjobs.runner.step import make_step

from jobs import mlp_spec, write_mlp
from references import mlp_flip_counts, numpy_mlp_jacobian, psi_nu

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    seen = []

    def listen(name, duration, **kwargs):
        if name == BACKEND_COMPILE:
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_step_is_a_pure_function_of_the_plan_matching_exact_references(tmp_path):
    w = write_mlp(tmp_path, sizes=(6, 24, 24, 10))
    spec = mlp_spec(w, local_scaling={"mode": "exact"}, local_rank={},
                    local_complexity={"directions": 3, "radius": 0.3, "per_layer": True})
    spec["execution"]["dtype"] = "float64"
    plan = plan_job(spec)
    z = np.random.default_rng(5).standard_normal((4, 6))
    out = make_step(plan)(plan.generator.params, plan.arrays, z, np.zeros(4, np.int32))
    layers = load_mlp_weights(w)
    for i in range(4):
        psi, nu, _ = psi_nu(numpy_mlp_jacobian(layers, z[i]))
        np.testing.assert_allclose([out["local_scaling"][i], out["local_rank"][i]], [psi, nu], rtol=1e-10)
        ref = mlp_flip_counts(layers, z[i], plan.arrays["B"], 0.3)
        assert list(np.asarray(out["local_complexity_per_layer"][i])) == ref
        assert int(out["local_complexity"][i]) == sum(ref)


def test_engine_compiles_once_and_batches_never_recompile(tmp_path):
    plan = plan_job(mlp_spec(write_mlp(tmp_path), batch_size=5,
                             local_scaling={"mode": "projection", "k": 5}, local_complexity={"directions": 2}))
    with count_compiles() as at_start:
        engine = Engine(plan)
    assert engine.compiled_count() == 1 and len(at_start) >= 1
    rng = np.random.default_rng(0)
    with count_compiles() as later:
        for m in (5, 3, 12, 1):          # full, short, several batches with a tail, one row
            res, errors = engine.compute(rng.standard_normal((m, 6)))
            assert errors == [None] * m and res["local_scaling"].shape == (m,)
    assert later == []
