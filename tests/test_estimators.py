"""Matrix-free estimators (mode: lanczos, mode: slq) against exact answers.

References are the dense Jacobian (or the known matrix) and NumPy's SVD. Tolerances:
- lanczos with steps = min(n, d) spans the whole right singular space, so its Ritz values ARE
  the singular values: compared to ~1e-10 relative to s_1 (float64 roundoff of ~d^2 flops).
- slq with steps = min(n, d) makes each probe's Gauss quadrature exact, so every per-probe value
  must equal v^T F v, F = 0.5 log(M^T M), to roundoff: a deterministic check. The probe MEAN
  is then Hutchinson's estimator, whose standard deviation for Rademacher probes is
  sigma = sqrt(2 (||F||_F^2 - sum_i F_ii^2) / N); it must land within 4 sigma of the exact psi
  (computed from F, not from the sample; probes are seeded, so the test is deterministic).
- Analytic cases where SLQ is exact for ANY probe count: M^T M diagonal (each +-1 probe gives
  v^T F v = tr F) with as many Lanczos steps as distinct eigenvalues (Gauss quadrature with
  m nodes is exact on an m-point spectrum); M = c Q (one step, immediate Krylov breakdown).
"""
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.errors import SpecError
from geomjobs.generators.mlp import load_mlp_weights, mlp_apply, random_mlp
from geomjobs.geometry.descriptors import local_rank, local_scaling
from geomjobs.geometry.estimators import (
    golub_kahan,
    krylov_dim,
    krylov_rtol,
    lanczos_descriptors,
    lanczos_singular_values,
    linear_operator,
    rademacher_probes,
    slq_log_volume,
    start_vector,
)
from geomjobs.geometry.spectrum import jacobian

from jobs import mlp_spec, read_sorted, write_mlp
from references import gram_log, hutchinson_sigma, matrix_with_singular_values, psi_nu_of_spectrum


def ref_psi_nu(s, rows, cols, factor=None):
    return psi_nu_of_spectrum(s, rows, cols, factor)[:2]


# Jitted entry points that take the operator as an ARGUMENT, so that one compile serves every
# matrix / weight draw of a shape (closures over constants would recompile per call).
@partial(jax.jit, static_argnames=("k", "steps"))
def lin_lanczos(a, v0, *, k, steps):
    return lanczos_singular_values(lambda z: a @ z, jnp.zeros(a.shape[1], a.dtype), v0, k=k, steps=steps)


@partial(jax.jit, static_argnames=("steps", "chunk"))
def lin_slq(a, probes, *, steps, chunk=None):
    return slq_log_volume(lambda z: a @ z, jnp.zeros(a.shape[1], a.dtype), probes, steps=steps, chunk=chunk)


@partial(jax.jit, static_argnames=("act", "k", "steps"))
def mlp_lanczos(layers, z, v0, *, act, k, steps):
    return lanczos_descriptors(lambda x: mlp_apply(layers, x, act), z, v0, k=k, steps=steps)


@partial(jax.jit, static_argnames=("act", "steps", "chunk"))
def mlp_slq(layers, z, probes, *, act, steps, chunk=None):
    return slq_log_volume(lambda x: mlp_apply(layers, x, act), z, probes, steps=steps, chunk=chunk)


MLPS = [([8, 32, 32, 40], "relu"), ([8, 32, 40], "tanh"), ([30, 24, 12], "tanh")]  # d < n and d > n


# ------------------------------------------------------------------ lanczos
@pytest.mark.parametrize("rows,cols", [(20, 8), (8, 20), (9, 9)])
def test_lanczos_full_depth_gives_exact_top_k_of_known_spectrum(rows, cols):
    c = min(rows, cols)
    s = np.geomspace(7.0, 1e-3, c)
    a = jnp.asarray(matrix_with_singular_values(s, rows, cols, seed=rows))
    got = lin_lanczos(a, start_vector(c, 1), k=c, steps=c)  # top-k for every k: the prefixes
    np.testing.assert_allclose(got, s, rtol=0, atol=1e-10 * s[0])


@pytest.mark.parametrize("sizes,act", MLPS)
def test_lanczos_full_depth_matches_dense_jacobian_svd_on_mlps(sizes, act):
    for seed in (0, 1):
        layers = random_mlp(sizes, seed=seed)
        z = jnp.asarray(np.random.default_rng(seed).standard_normal(sizes[0]))
        a = np.asarray(jacobian(lambda x: mlp_apply(layers, x, act), z))  # noqa: B023
        s = np.linalg.svd(a, compute_uv=False)
        c = len(s)
        got, psi, nu = mlp_lanczos(layers, z, start_vector(c, 0), act=act, k=5, steps=c)
        np.testing.assert_allclose(got, s[:5], rtol=0, atol=1e-10 * s[0])
        ref = ref_psi_nu(s[:5], krylov_dim(*a.shape), 1)
        np.testing.assert_allclose([psi, nu], ref, rtol=1e-9)


def test_lanczos_ritz_values_interlace_from_below_and_top_one_converges_first():
    # Krylov depth < d: Ritz values are lower bounds s_i(B) <= s_i(A) (Cauchy interlacing of the
    # projected matrix); the largest, well separated here, is converged long before the rest.
    s = np.concatenate([[10.0, 5.0], np.linspace(1.0, 0.5, 38)])
    a = jnp.asarray(matrix_with_singular_values(s, 60, 40, seed=2))
    got = np.asarray(lin_lanczos(a, start_vector(40, 3), k=6, steps=12))
    assert np.all(got <= s[:6] * (1 + 1e-12))
    np.testing.assert_allclose(got[:2], s[:2], rtol=1e-8)
    assert got[5] < s[5] * (1 - 1e-6)  # an unconverged interior value: the check can fail


@pytest.mark.parametrize("scale,a", [(2.5, 2.5 * np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))[0]),
                                     (2.0, 2.0 * np.eye(8))])
def test_lanczos_finds_repeated_singular_values_across_breakdown(scale, a):
    # Krylov space of a scaled orthogonal map is 1-D: bidiagonalisation breaks down after one
    # step. Restarting finds all copies of the repeated value, and nothing divides 0 by 0.
    got = lin_lanczos(jnp.asarray(a), start_vector(8, 0), k=4, steps=8)
    np.testing.assert_allclose(got, np.full(4, scale), rtol=1e-12)


def test_golub_kahan_full_depth_bidiagonal_has_the_operators_singular_values():
    a = np.random.default_rng(5).standard_normal((15, 6))
    am = jnp.asarray(a)
    b = golub_kahan(lambda v: am @ v, lambda u: am.T @ u, jnp.ones(6), 6, 15)
    bd = np.diag(b.alphas) + np.diag(b.betas[1:], 1)
    np.testing.assert_allclose(np.linalg.svd(bd, compute_uv=False), np.linalg.svd(a, compute_uv=False), rtol=1e-11)
    with pytest.raises(ValueError, match="steps <= min"):
        golub_kahan(lambda v: am @ v, lambda u: am.T @ u, jnp.ones(6), 7, 15)


# ------------------------------------------------------------------ slq
@pytest.mark.parametrize("case", ["known-tall", "known-wide", "relu-mlp", "tanh-mlp", "wide-mlp"])
def test_slq_full_depth_is_exact_per_probe_and_mean_is_within_hutchinson_sigma(case):
    num = 64
    if case.startswith("known"):
        rows, cols = (30, 10) if case == "known-tall" else (10, 30)
        a = matrix_with_singular_values(np.geomspace(4.0, 0.02, 10), rows, cols, seed=7)
        probes = rademacher_probes(num, 10, seed=11)
        r = lin_slq(jnp.asarray(a), probes, steps=10, chunk=24)
    else:
        sizes, act = {"relu-mlp": MLPS[0], "tanh-mlp": MLPS[1], "wide-mlp": MLPS[2]}[case]
        layers = random_mlp(sizes, seed=3)
        z = jnp.asarray(np.random.default_rng(4).standard_normal(sizes[0]))
        a = np.asarray(jacobian(lambda x: mlp_apply(layers, x, act), z))
        probes = rademacher_probes(num, min(a.shape), seed=11)
        r = mlp_slq(layers, z, probes, act=act, steps=min(a.shape), chunk=24)
    f = gram_log(a)
    # deterministic: Gauss quadrature with c nodes on a c-point spectrum is exact
    np.testing.assert_allclose(r.probe_values, np.einsum("pi,ij,pj->p", probes, f, probes), rtol=1e-8, atol=1e-8)
    psi_exact = np.trace(f)
    np.testing.assert_allclose(psi_exact, ref_psi_nu(np.linalg.svd(a, compute_uv=False), *a.shape)[0], rtol=1e-10)
    assert abs(float(r.local_scaling) - psi_exact) <= 4 * hutchinson_sigma(f, num)
    np.testing.assert_allclose(r.local_scaling_sem, np.std(r.probe_values) / np.sqrt(num), rtol=1e-12)


def test_slq_nu_is_the_ratio_of_two_exact_quadratic_forms_and_close_to_exact_nu():
    layers = random_mlp([8, 32, 40], seed=2)
    z = jnp.asarray(np.random.default_rng(0).standard_normal(8))
    a = np.asarray(jacobian(lambda x: mlp_apply(layers, x, "tanh"), z))
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    f1 = (vt.T * s) @ vt                  # (M^T M)^{1/2}
    f2 = (vt.T * (s * np.log(s))) @ vt    # its s log s
    num = 200
    probes = rademacher_probes(num, 8, seed=1)
    r = mlp_slq(layers, z, probes, act="tanh", steps=8)
    big_s = np.mean(np.einsum("pi,ij,pj->p", probes, f1, probes))
    big_t = np.mean(np.einsum("pi,ij,pj->p", probes, f2, probes))
    np.testing.assert_allclose(r.local_rank, big_s * np.exp(-big_t / big_s), rtol=1e-9)
    # delta method: log nu = h(S, T) = log S - T/S; Var from Hutchinson's covariances
    nu_exact = ref_psi_nu(s, *a.shape)[1]
    S, T = s.sum(), (s * np.log(s)).sum()
    grad = np.array([1 / S + T / S**2, -1 / S])
    cov = np.array([[np.sum(x * y) - np.sum(np.diag(x) * np.diag(y)) for y in (f1, f2)] for x in (f1, f2)]) * 2 / num
    sigma = np.sqrt(grad @ cov @ grad)
    # a ratio of unbiased estimates is biased at O(1/N): the second-order term of the same
    # expansion, 0.5 tr(H cov) with H the Hessian of h; allowed twice over
    hess = np.array([[-1 / S**2 - 2 * T / S**3, 1 / S**2], [1 / S**2, 0.0]])
    bias = 0.5 * np.sum(hess * cov)
    assert abs(np.log(float(r.local_rank)) - np.log(nu_exact)) <= 4 * sigma + 2 * abs(bias)


@pytest.mark.parametrize("rows", [5, 12])
def test_slq_exact_for_any_probe_count_when_gram_matrix_is_diagonal(rows):
    # M^T M = diag(s^2) with three distinct values (one of them 0: rank deficient): every +-1
    # probe gives v^T F v = tr F, and 3 Lanczos steps integrate a 3-point spectrum exactly.
    # The zero singular values must be masked by the rank tolerance, not contribute log(0).
    s = np.array([4.0, 4.0, 1.0, 0.0, 0.0])
    u = np.linalg.qr(np.random.default_rng(rows).standard_normal((rows, rows)))[0][:, :5]
    am = jnp.asarray(u * s)
    psi, nu = ref_psi_nu(s[s > 0], rows, 5)
    for num in (1, 2):
        r = lin_slq(am, rademacher_probes(num, 5, seed=num), steps=3)
        np.testing.assert_allclose([r.local_scaling, r.local_rank], [psi, nu], rtol=1e-10)
        assert float(r.local_scaling_sem) < 1e-12


@pytest.mark.parametrize("d", [1, 3, 8])
def test_slq_scaled_orthogonal_map_is_exact_with_one_step(d):
    q = np.linalg.qr(np.random.default_rng(d).standard_normal((d, d)))[0] * 2.5
    r = lin_slq(jnp.asarray(q), rademacher_probes(3, d, 0), steps=1)
    np.testing.assert_allclose([r.local_scaling, r.local_rank], [d * np.log(2.5), d], rtol=1e-12)


def test_slq_and_lanczos_of_zero_jacobian_are_zero_psi_unit_rank_not_nan():
    r = lin_slq(jnp.zeros((5, 5)), rademacher_probes(2, 5, 0), steps=3)  # shapes compiled above
    assert float(r.local_scaling) == 0.0 and float(r.local_rank) == 1.0
    s = lin_lanczos(jnp.zeros((8, 8)), start_vector(8, 0), k=4, steps=8)
    assert np.all(np.asarray(s) == 0)
    rtol = krylov_rtol(8, 8, np.float64)
    assert float(local_scaling(s, rtol)) == 0.0 and float(local_rank(s, rtol)) == 1.0


def test_float32_generator_stays_float32_and_accurate_under_x64():
    # matfree 0.6.3's bidiag fails here (its Krylov buffers take the default float64 dtype).
    layers = [(w.astype(np.float32), b.astype(np.float32)) for w, b in random_mlp([6, 24, 24, 10], seed=1)]
    g = lambda x: mlp_apply(layers, x, "relu")  # noqa: E731
    z = jnp.asarray(np.random.default_rng(2).standard_normal(6), jnp.float32)
    s = np.linalg.svd(np.asarray(jacobian(g, z), np.float64), compute_uv=False)
    got, _, _ = mlp_lanczos(layers, z, start_vector(6, 0), act="relu", k=6, steps=6)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, s, rtol=0, atol=1e-5 * s[0])
    r = mlp_slq(layers, z, rademacher_probes(4, 6, 0), act="relu", steps=6)
    assert r.local_scaling.dtype == jnp.float32
    a = np.asarray(jacobian(g, z), np.float64)
    np.testing.assert_allclose(r.probe_values, np.einsum("pi,ij,pj->p", rademacher_probes(4, 6, 0), gram_log(a),
                                                          rademacher_probes(4, 6, 0)), rtol=1e-4, atol=1e-4)


def test_estimators_jit_and_vmap_over_a_batch_and_use_only_jvp_vjp():
    layers = random_mlp([6, 20, 16], seed=0)
    g = lambda x: mlp_apply(layers, x, "relu")  # noqa: E731
    zs = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6)))
    probes, v0 = rademacher_probes(4, 6, 0), start_vector(6, 0)
    f = jax.jit(jax.vmap(lambda z: (slq_log_volume(g, z, probes, steps=5, chunk=3).local_scaling,
                                    lanczos_singular_values(g, z, v0, k=2, steps=4))))
    psi_b, s_b = f(zs)
    for i, z in enumerate(zs):  # one sample at a time, all probes at once (chunk None)
        np.testing.assert_allclose(psi_b[i], mlp_slq(layers, z, probes, act="relu", steps=5).local_scaling, rtol=1e-10)
        np.testing.assert_allclose(s_b[i], mlp_lanczos(layers, z, v0, act="relu", k=2, steps=4)[0], rtol=1e-10)
    # no dense Jacobian: the jaxpr holds no (n x d) array
    jaxpr = jax.make_jaxpr(lambda z: slq_log_volume(g, z, probes, steps=5).local_scaling)(zs[0])
    shapes = {tuple(v.aval.shape) for eq in jaxpr.jaxpr.eqns for v in eq.outvars}
    assert (16, 6) not in shapes and (6, 16) not in shapes
    n, d, _, _ = linear_operator(g, zs[0])
    assert (n, d) == (16, 6)


# ------------------------------------------------------------------ jobs
def test_lanczos_job_equals_exact_singular_values(tmp_path):
    from geomjobs import run_job

    w = write_mlp(tmp_path)  # d = 6, n = 10, float32 job
    spec = mlp_spec(w, count=12, local_scaling={"mode": "lanczos", "k": 4, "steps": 6, "save_singular_values": True},
                    local_rank={})
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok
    df = read_sorted(tmp_path / "out")
    from geomjobs.latents import build_latents

    layers = load_mlp_weights(w)
    z = build_latents(spec["latents"]).latents(np.arange(12))
    for i in (0, 5, 11):
        a = np.asarray(jax.jacfwd(lambda x: mlp_apply(layers, x))(jnp.asarray(z[i], jnp.float64)))
        s = np.linalg.svd(a, compute_uv=False)
        np.testing.assert_allclose(np.asarray(df.singular_values[i]), s[:4], rtol=0, atol=1e-5 * s[0])
        psi, nu = ref_psi_nu(s[:4], krylov_dim(10, 6), 6)
        np.testing.assert_allclose([df.local_scaling[i], df.local_rank[i]], [psi, nu], rtol=1e-4, atol=1e-4)


def test_slq_job_reproduces_the_estimator_with_the_jobs_probes(tmp_path):
    from geomjobs import run_job
    from geomjobs.latents import build_latents

    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=10, local_scaling={"mode": "slq", "num_probes": 8, "seed": 4}, local_rank={})
    spec["execution"]["dtype"] = "float64"
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok
    df = read_sorted(tmp_path / "out")
    assert df.singular_values.isna().all()
    layers = load_mlp_weights(w)
    z = build_latents(spec["latents"]).latents(np.arange(10))
    g = lambda x: mlp_apply(layers, x)  # noqa: E731
    for i in (0, 9):
        # the job's probes: 8 from seed 4; its default steps = min(n, d, 30) = 6
        r = slq_log_volume(g, jnp.asarray(z[i], jnp.float64), rademacher_probes(8, 6, 4), steps=6)
        np.testing.assert_allclose([df.local_scaling[i], df.local_rank[i]], [r.local_scaling, r.local_rank], rtol=1e-9)


@pytest.mark.parametrize("ls,key,msg", [
    ({"mode": "lanczos", "k": 7}, "k", "k <= min(n, d) = 6"),
    ({"mode": "lanczos", "k": 3, "steps": 2}, "steps", "steps >= k = 3"),
    ({"mode": "lanczos", "steps": 9}, "steps", "steps <= min(n, d) = 6"),
    ({"mode": "slq", "steps": 7}, "steps", "steps <= min(n, d) = 6"),
    ({"mode": "slq", "k": 3}, "k", "only applies to mode: lanczos or projection"),
    ({"mode": "lanczos", "num_probes": 3}, "num_probes", "only applies to mode: slq"),
    ({"mode": "exact", "steps": 3}, "steps", "only applies to mode: lanczos or slq"),
    ({"mode": "slq", "save_singular_values": True}, "save_singular_values", "without individual singular values"),
])
def test_estimator_spec_errors_name_the_key(tmp_path, ls, key, msg):
    from geomjobs.runner.plan import plan_job

    with pytest.raises(SpecError) as e:
        plan_job(mlp_spec(write_mlp(tmp_path), local_scaling=ls))
    assert e.value.key == f"descriptors.local_scaling.{key}" and msg in str(e.value)


def test_estimator_defaults(tmp_path):
    from geomjobs.runner.plan import plan_job

    w = write_mlp(tmp_path)
    ls = plan_job(mlp_spec(w, local_scaling={"mode": "lanczos", "k": 2})).spec["descriptors"]["local_scaling"]
    assert (ls["k"], ls["steps"]) == (2, 6)
    ls = plan_job(mlp_spec(w, local_scaling={"mode": "slq"})).spec["descriptors"]["local_scaling"]
    assert (ls["num_probes"], ls["steps"], ls["chunk"], ls["seed"]) == (16, 6, 16, 0)
