"""Windowed posteriors (``posterior.window``): each bundle's posterior kept on the w x w cells
around its own point, so the posteriors and the F fit are linear in the number of grid points.
Exact references: with every window the whole grid the windowed code is the dense code; the
window indices are the block around each point; on an exponential family with the exact
log-likelihood (whose tempered posteriors are exactly <u, a_m> - F(u) - c_m on any set of cells)
a small window recovers F's curvature as the full grid does."""
import numpy as np
import pytest

from geomjobs.errors import SpecError
from geomjobs.fisher.posterior import bundle_posteriors, feature_loglik, window_cells
from geomjobs.fisher.potential import PotentialConfig, fit_potential
from geomjobs.fisher.shapefit import bundle_curvature, grid_values


def _grid(R1, R2):
    a1, a2 = np.linspace(-1, 1, R1), np.linspace(-0.5, 0.7, R2)
    return np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)


def test_window_cells_are_the_block_around_each_point():
    cells = window_cells((6, 5), 3)
    assert cells.shape == (30, 9)
    for p in range(30):
        i, j = divmod(p, 5)
        r, c = np.divmod(cells[p], 5)
        assert p in cells[p] and len(set(cells[p])) == 9
        assert r.max() - r.min() == 2 and c.max() - c.min() == 2
        if 1 <= i <= 4 and 1 <= j <= 3:          # centred away from the edges
            assert r.min() == i - 1 and c.min() == j - 1
    np.testing.assert_array_equal(window_cells((4, 3), 0), np.tile(np.arange(12), (12, 1)))
    np.testing.assert_array_equal(window_cells((4, 3), 9), np.tile(np.arange(12), (12, 1)))


def test_windowed_feature_loglik_is_the_dense_one_restricted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 6, 8, 8))
    feats = lambda im: np.asarray(im).reshape(-1, 64)[:, :5] * 2.0  # noqa: E731
    dense = feature_loglik(feats, x)
    cells = window_cells((5, 4), 3)
    win = feature_loglik(feats, x, cells, chunk_floats=50)     # several chunks
    np.testing.assert_allclose(win, np.take_along_axis(dense, cells[:, None, :], 2), rtol=1e-12, atol=1e-12)


def _expfam(R1=9, R2=8, seed=0):
    """Tempered posteriors of an exponential family with F(u) = cosh(u1) + u2^4 / 4 + u1 u2 / 2,
    bundles with statistics a_m = grad F at their point plus noise: log p_m(t) = <u, a_m> - F(u)."""
    u = _grid(R1, R2)
    F = np.cosh(u[:, 0]) + u[:, 1] ** 4 / 4 + u[:, 0] * u[:, 1] / 2
    gF = np.column_stack([np.sinh(u[:, 0]) + u[:, 1] / 2, u[:, 1] ** 3 + u[:, 0] / 2])
    rng = np.random.default_rng(seed)
    pts = np.repeat(np.arange(len(u)), 2)
    a = gF[pts] + 0.05 * rng.normal(size=(len(pts), 2))
    lp = a @ u.T - F[None]
    lp -= lp.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    H = np.stack([np.stack([np.cosh(u[:, 0]), np.full(len(u), 0.5)], -1),
                  np.stack([np.full(len(u), 0.5), 3 * u[:, 1] ** 2], -1)], -2)
    return u, lp, pts, F, H


def _window(lp, pts, cells):
    """Rows of lp restricted to each bundle's window and renormalised there."""
    c = cells[pts]
    w = np.take_along_axis(lp, c, 1)
    w -= np.log(np.exp(w - w.max(1, keepdims=True)).sum(1, keepdims=True)) + w.max(1, keepdims=True)
    return w, c


def test_full_windows_reproduce_the_dense_fits():
    u, lp, pts, _, _ = _expfam()
    full = window_cells((9, 8), 0)
    wl, c = _window(lp, pts, full)
    F0, a0 = grid_values(u, lp, pts)
    F1, a1 = grid_values(u, wl, pts, c)
    np.testing.assert_allclose(F1, F0, atol=1e-8)
    np.testing.assert_allclose(a1, a0, atol=1e-8)
    np.testing.assert_allclose(bundle_curvature(u, wl, pts, c), bundle_curvature(u, lp, pts), atol=1e-8)


@pytest.mark.parametrize("fit", ["shape", "curvature"])
def test_small_windows_recover_the_exponential_familys_metric(fit):
    """With the exact exponential-family posteriors every window holds the same F up to an affine
    term, so a 5 x 5 window gives the full grid's metric to the spline's error: the windowed metric
    differs from the dense one by < 2 % (Frobenius, interior), and both from the exact Hessian by
    < 5 % (the quintic spline on a 9 x 8 grid; the curvature fit's window spline has degree 4)."""
    u, lp, pts, _, H = _expfam()
    cfg = PotentialConfig(fit=fit)
    wl, c = _window(lp, pts, window_cells((9, 8), 5))
    dense, _ = fit_potential(u, lp, pts, cfg)
    win, _ = fit_potential(u, wl, pts, cfg, cells=c)
    inner = np.zeros((9, 8), bool)
    inner[1:-1, 1:-1] = True
    inner = inner.ravel()
    gd, gw = dense.hessian(u)[inner], win.hessian(u)[inner]
    rel = lambda a, b: np.sqrt(((a - b) ** 2).sum() / (b ** 2).sum())  # noqa: E731
    assert rel(gw, gd) < 0.02, rel(gw, gd)
    assert rel(gw, H[inner]) < 0.05 and rel(gd, H[inner]) < 0.05, (rel(gw, H[inner]), rel(gd, H[inner]))


def test_windowed_js_fit_runs_and_matches_dense_on_full_windows():
    u, lp, pts, _, _ = _expfam(6, 6)
    cfg = PotentialConfig(steps=50)
    wl, c = _window(lp, pts, window_cells((6, 6), 0))
    dense, d_info = fit_potential(u, lp, pts, cfg)
    win, w_info = fit_potential(u, wl, pts, cfg, cells=c)
    np.testing.assert_allclose(w_info["loss_history"], d_info["loss_history"], rtol=1e-4, atol=1e-6)


def test_bundle_posteriors_on_windows_normalise_over_the_window():
    ll = np.random.default_rng(1).normal(size=(12, 4, 9))
    lp, pts = bundle_posteriors(ll, 2, 3)
    assert lp.shape == (36, 9)
    np.testing.assert_allclose(np.exp(lp).sum(1), 1.0)


def test_window_of_one_or_two_is_refused():
    from geomjobs.fisher.spec import validate_fisher_spec

    raw = {"family": {"kind": "ising", "L": 4}, "grid": {"low": [0.2, -0.1], "high": [0.4, 0.1], "resolution": [5, 5]},
           "samples_per_point": 8, "posterior": {"kind": "oracle", "window": 2}}
    with pytest.raises(SpecError) as e:
        validate_fisher_spec(raw)
    assert e.value.key == "posterior.window"


def test_smooth_grid_keeps_quadratics_and_damps_a_wave_by_the_gaussians_transfer():
    """A quadratic F (a constant metric) is unchanged; a wave of wavelength 16 cells on it is damped
    by the Gaussian's transfer function exp(-2 pi^2 sigma^2 / 16^2) away from the edges (exact
    for the continuous filter; the sampled kernel agrees to 1e-3 at sigma = 2)."""
    from geomjobs.fisher.shapefit import smooth_grid

    a = np.arange(64.0)
    u = np.stack(np.meshgrid(a, a, indexing="ij"), -1).reshape(-1, 2)
    quad = (0.3 * u[:, 0] ** 2 - 0.1 * u[:, 0] * u[:, 1] + 0.05 * u[:, 1] ** 2 + u[:, 1]).reshape(64, 64)
    np.testing.assert_allclose(smooth_grid(u, quad, 2.0), quad, atol=1e-8 * np.abs(quad).max())
    wave = np.sin(2 * np.pi * a / 16)[:, None] * np.ones(64)[None]
    out = smooth_grid(u, quad + wave, 2.0) - quad
    # the wave is not orthogonal to quadratics on a finite grid: compare the filtered wave's interior
    # against the transfer function times the wave, up to the quadratic the fit absorbed
    resid = out[16:48, 16:48] - np.exp(-2 * np.pi ** 2 * 4 / 256) * wave[16:48, 16:48]
    assert np.abs(resid - resid.mean()).max() < 0.02
