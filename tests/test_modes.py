"""Every local-scaling mode in the registry, through its one interface, on linear maps with
known spectra. Each mode runs at the settings where its answer is exact in exact arithmetic
(projection with k = n: W is square orthogonal, so W A has A's singular values; lanczos at full
Krylov depth; slq on a map whose Gram matrix is diagonal, where every Rademacher probe gives
v^T F v = tr F and full-depth Gauss quadrature is exact), so psi and nu must match the numpy
reference to float64 roundoff: 1e-10 relative covers O(d^2) flops at eps = 2.2e-16 with room.
A mode added to geometry/modes/ joins this table by itself; if its defaults are not exact on
these maps, it needs an entry in EXACT_SETTINGS.
"""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.geometry import modes
from geomjobs.geometry.estimators import krylov_dim
from geomjobs.geometry.modes import ESTIMATORS, Dims

from references import psi_nu_of_spectrum


def exact_settings(name, n, d):
    c = min(n, d)
    return {"projection": {"k": n, "chunk": 2}, "lanczos": {"k": c, "steps": c},
            "slq": {"steps": c, "num_probes": 3, "chunk": 2}}.get(name, {})


def diagonal_gram_map(s, n, d, seed):
    """n x d matrix with singular values s whose Gram matrix on the smaller side is diagonal:
    A = U[:, :d] diag(s) (tall) or diag(s) V[:n] (wide), U, V Haar orthogonal."""
    q = np.linalg.qr(np.random.default_rng(seed).standard_normal((max(n, d), max(n, d))))[0]
    if d <= n:
        return q[:, :d] * s
    return s[:, None] * q[:n]


SPECTRA = {
    "tall, distinct": (9, 5, np.array([5.0, 3.0, 2.0, 0.5, 0.1])),
    "wide, distinct": (4, 7, np.array([2.0, 1.5, 1.0, 0.25])),
    "rank deficient": (6, 5, np.array([4.0, 4.0, 1.0, 0.0, 0.0])),
    "scaled orthogonal": (5, 5, np.full(5, 2.5)),
}


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
@pytest.mark.parametrize("case", sorted(SPECTRA))
def test_every_mode_gives_exact_psi_nu_on_known_spectra(name, case):
    n, d, s = SPECTRA[case]
    a = jnp.asarray(diagonal_gram_map(s, n, d, seed=len(case)))
    cfg_in = {"mode": name, "seed": 0, "save_singular_values": False, **exact_settings(name, n, d)}
    frozen = copy.deepcopy(cfg_in)
    est, cfg = modes.resolve(cfg_in, Dims(n, d))
    assert cfg_in == frozen                                  # the spec's section is not written to
    arrays = {k: jnp.asarray(v) for k, v in est.arrays(cfg, Dims(n, d)).items()}
    again = est.arrays(cfg, Dims(n, d))
    assert all(np.array_equal(arrays[k], again[k]) for k in again)   # fixed per job by the seed

    @jax.jit
    def batch(a, arrays, zs):
        return jax.vmap(lambda z: est.apply(lambda x: a @ x, z, arrays, cfg))(zs)

    out = batch(a, arrays, jnp.zeros((2, d)))               # two latents: a linear map is the same at both
    factor = krylov_dim(n, d) if name in ("lanczos", "slq") else max(n, d)
    psi, nu, _ = psi_nu_of_spectrum(s, n, d, factor)
    np.testing.assert_allclose(out.local_scaling, [psi, psi], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.local_rank, [nu, nu], rtol=1e-10)
    if out.singular_values is not None:
        m = out.singular_values.shape[1]
        np.testing.assert_allclose(out.singular_values[0], np.sort(s)[::-1][:m], rtol=1e-10, atol=1e-12)
    assert est.has_singular_values == (out.singular_values is not None)


def test_registry_holds_the_four_documented_modes_and_picks_exact_for_small_maps():
    assert set(ESTIMATORS) >= {"exact", "projection", "lanczos", "slq"}
    assert modes.default_mode(Dims(10, 6)) == "exact"
    assert modes.default_mode(Dims(3 * 512 * 512, 4 * 64 * 64)) == "projection"
