"""psi and nu against exact references: dense Jacobian + numpy SVD, and analytic cases."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.generators.mlp import mlp_apply, random_mlp
from geomjobs.geometry import (
    exact_singular_values,
    local_rank,
    local_scaling,
    matrix_rank_rtol,
    orthonormal_rows,
    projected_singular_values,
)
from geomjobs.geometry.spectrum import jacobian, projected_rows

from references import matrix_with_singular_values, numpy_mlp_jacobian
from references import psi_nu as ref_psi_nu


def tol(rows, cols):
    """The SPEC's rank tolerance of a float64 rows x cols matrix."""
    return matrix_rank_rtol(rows, cols, np.float64)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("sizes", [[5, 32, 32, 12], [12, 24, 4]])  # d < n and d > n
def test_exact_mode_matches_numpy_svd_of_handmade_jacobian(seed, act, sizes):
    layers = random_mlp(sizes, seed=seed)
    z = np.random.default_rng(seed + 10).standard_normal(sizes[0])
    g = lambda x: mlp_apply(layers, x, act)  # noqa: E731
    a_ref = numpy_mlp_jacobian(layers, z, act)
    np.testing.assert_allclose(jacobian(g, jnp.asarray(z)), a_ref, rtol=1e-10, atol=1e-12)
    s = exact_singular_values(g, jnp.asarray(z))
    psi, nu, m = ref_psi_nu(a_ref)
    assert m >= 1
    # float64 SVD of the same matrix: agreement to ~1e-10 relative is what LAPACK delivers.
    np.testing.assert_allclose(local_scaling(s, tol(*a_ref.shape)), psi, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(local_rank(s, tol(*a_ref.shape)), nu, rtol=1e-9)


def test_linear_map_psi_is_sum_log_sigma():
    sig = np.array([3.0, 2.0, 0.5, 0.1])
    a = matrix_with_singular_values(sig, 7, 4, seed=3)
    s = exact_singular_values(lambda z: jnp.asarray(a) @ z, jnp.ones(4))
    np.testing.assert_allclose(local_scaling(s, tol(7, 4)), np.log(sig).sum(), rtol=1e-12)
    p = sig / sig.sum()
    np.testing.assert_allclose(local_rank(s, tol(7, 4)), np.exp(-(p * np.log(p)).sum()), rtol=1e-12)


@pytest.mark.parametrize("d", [1, 3, 8])
def test_scaled_orthogonal_map_has_full_effective_rank(d):
    q = orthonormal_rows(d, d, seed=d, stream="test") * 2.5
    s = exact_singular_values(lambda z: jnp.asarray(q) @ z, jnp.zeros(d))
    np.testing.assert_allclose(local_rank(s, tol(d, d)), d, rtol=1e-12)
    np.testing.assert_allclose(local_scaling(s, tol(d, d)), d * np.log(2.5), rtol=1e-12)


def test_rank_tolerance_drops_numerically_zero_singular_values():
    # rank-2 map in R^5: the three zero singular values come out at ~1e-16 and must not count,
    # else psi would be dominated by log(1e-16) terms.
    sig = np.array([4.0, 1.0])
    a = matrix_with_singular_values(sig, 5, 5, seed=1)
    s = exact_singular_values(lambda z: jnp.asarray(a) @ z, jnp.ones(5))
    assert np.sum(np.asarray(s) > 0) >= 2
    np.testing.assert_allclose(local_scaling(s, tol(5, 5)), np.log(4.0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(local_rank(s, tol(5, 5)), ref_psi_nu(a)[1], rtol=1e-9)


def test_all_zero_jacobian_gives_zero_psi_and_unit_rank_not_nan():
    s = exact_singular_values(lambda z: 0.0 * z, jnp.ones(3))
    assert float(local_scaling(s, tol(3, 3))) == 0.0
    assert float(local_rank(s, tol(3, 3))) == 1.0   # no kept value: the empty spectrum's rank


def test_orthonormal_rows_are_orthonormal_and_seeded():
    w = orthonormal_rows(20, 300, seed=7, stream="W")
    np.testing.assert_allclose(w @ w.T, np.eye(20), atol=1e-12)
    np.testing.assert_array_equal(w, orthonormal_rows(20, 300, seed=7, stream="W"))
    assert not np.allclose(w, orthonormal_rows(20, 300, seed=8, stream="W"))
    assert not np.allclose(w[:4, :4], orthonormal_rows(20, 300, seed=7, stream="B")[:4, :4])
    with pytest.raises(ValueError, match="rows <= cols"):
        orthonormal_rows(5, 4, seed=0, stream="W")


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 30])
def test_projection_equals_dense_svd_of_w_times_a(chunk):
    layers = random_mlp([6, 40, 40, 50], seed=4)
    g = lambda x: mlp_apply(layers, x, "relu")  # noqa: E731
    z = jnp.asarray(np.random.default_rng(1).standard_normal(6))
    w = orthonormal_rows(9, 50, seed=0, stream="W")
    a = numpy_mlp_jacobian(layers, np.asarray(z))
    np.testing.assert_allclose(projected_rows(g, z, jnp.asarray(w), chunk=chunk), w @ a, rtol=1e-10, atol=1e-12)
    s = projected_singular_values(g, z, jnp.asarray(w), chunk=chunk)
    psi, nu, _ = ref_psi_nu(w @ a)
    np.testing.assert_allclose(local_scaling(s, tol(9, 6)), psi, rtol=1e-9)
    np.testing.assert_allclose(local_rank(s, tol(9, 6)), nu, rtol=1e-9)


def test_projection_with_k_equal_n_recovers_exact_singular_values():
    # W orthogonal (k = n): W A has the singular values of A.
    layers = random_mlp([4, 16, 8], seed=2)
    g = lambda x: mlp_apply(layers, x, "tanh")  # noqa: E731
    z = jnp.ones(4) * 0.3
    w = jnp.asarray(orthonormal_rows(8, 8, seed=5, stream="W"))
    np.testing.assert_allclose(projected_singular_values(g, z, w), exact_singular_values(g, z), rtol=1e-10)


def test_descriptors_vmap_and_jit_over_a_batch():
    layers = random_mlp([5, 16, 9], seed=3)
    g = lambda x: mlp_apply(layers, x, "relu")  # noqa: E731
    zs = np.random.default_rng(2).standard_normal((6, 5))
    w = jnp.asarray(orthonormal_rows(4, 9, seed=0, stream="W"))
    f = jax.jit(jax.vmap(lambda z: local_scaling(projected_singular_values(g, z, w, chunk=3), tol(4, 5))))
    batch = f(jnp.asarray(zs))
    single = [local_scaling(projected_singular_values(g, jnp.asarray(z), w), tol(4, 5)) for z in zs]
    np.testing.assert_allclose(batch, single, rtol=1e-10)
