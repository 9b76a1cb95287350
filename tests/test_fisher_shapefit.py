"""``potential.fit: shape | curvature`` (geomjobs.fisher.shapefit) and ``posterior.folds``
(cross-fitting): F's grid values from the posteriors' shapes, the spline that reads them, the
metric from each posterior's curvature at its own point, and every sample scored by a network
that did not see it."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import RectBivariateSpline

from geomjobs.fisher import ising, posterior, shapefit, tasep
from geomjobs.fisher.posterior import PosteriorConfig
from geomjobs.fisher.potential import PotentialConfig, error_table, fit_potential


def grid(R1, R2, lo, hi):
    a1, a2 = np.linspace(lo[0], hi[0], R1), np.linspace(lo[1], hi[1], R2)
    th = np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)
    m = np.zeros((R1, R2), bool)
    m[1:-1, 1:-1] = True
    return th, m.ravel()


def limit_posteriors(ex, th):
    """The N -> infinity tempered posteriors of an exponential family, exp(<t, grad F(t')> - F(t)),
    log-normalised over the grid: (P, P), row t'."""
    lp = ex["dF"] @ th.T - ex["F"][None, :]
    lp -= lp.max(1, keepdims=True)
    return lp - np.log(np.exp(lp).sum(1, keepdims=True))


def test_grid_values_are_log_z_for_an_exponential_family():
    """Fed exact exponential-family posteriors (Ising L = 4, the issue's 9 x 9 grid), the weighted
    least squares returns log Z on the grid up to an affine function, to float64 rounding (the
    system is exact: ~1e-9 of F's range), and each bundle's linear term is E[T] at its point."""
    th, _ = grid(9, 9, (0.15, -0.25), (0.55, 0.25))
    ex = ising.exact_enumeration(4, th)
    lp = limit_posteriors(ex, th)
    F, a = shapefit.grid_values(th, lp, np.arange(len(th)))
    X = np.column_stack([np.ones(len(th)), th])
    d = F - ex["F"]
    resid = d - X @ np.linalg.lstsq(X, d, rcond=None)[0]
    assert np.abs(resid).max() < 1e-9 * np.ptp(ex["F"]), np.abs(resid).max()
    assert np.abs(X.T @ F).max() < 1e-6 * np.abs(F).max()           # the gauge: F orthogonal to (1, t)
    # a_m = E[T](t'_m) + the common vector that F's affine gauge moved
    off = a - ex["dF"]
    assert np.abs(off - off.mean(0)).max() < 1e-6 * np.abs(ex["dF"]).max()


@pytest.mark.parametrize("fit", ["shape", "curvature"])
def test_spline_reads_the_metric_of_exact_grid_values(fit):
    """The same exact posteriors through fit_potential: the metric's relative error over the
    interior is the quintic spline's readout of exact values, O(h^4): measured 0.0077 (second
    differences of the exact log Z at the grid step give 0.065, a cubic spline 0.050). Bound 0.012.
    grad F is E[T] (the gauge matches the bundles' linear terms): RMSE per site < 2e-3."""
    th, inner = grid(9, 9, (0.15, -0.25), (0.55, 0.25))
    ex = ising.exact_enumeration(4, th)
    pot, info = fit_potential(th, limit_posteriors(ex, th), np.arange(len(th)), PotentialConfig(fit=fit))
    assert info["loss"] < 1e-6
    e = error_table(th, pot.F(th), pot.grad(th), pot.hessian(th), ex, 16, inner)
    assert e["metric_rel_error"] < 0.012 and e["metric_median_rel_error"] < 0.01, e
    assert max(e["rmse_dF_1"], e["rmse_dF_2"]) < 2e-3 and e["rmse_F"] < 1e-4, e


def _tasep_limit(L=8, R=10):
    """TASEP L's N -> infinity tempered posteriors, -KL(p_t' || p_t) + const, on [0.1, 0.9]^2."""
    th, inner = grid(R, R, (0.1, 0.1), (0.9, 0.9))
    logp = np.stack([np.log(tasep.stationary_mpa(L, t)) for t in th])
    cross = np.exp(logp) @ logp.T
    lp = cross - cross.max(1, keepdims=True)
    return th, lp - np.log(np.exp(lp).sum(1, keepdims=True)), inner


def test_curvature_reads_a_non_exponential_family():
    """TASEP is not an exponential family in (alpha, beta) nor in log rates, so no F has a Bregman
    divergence equal to -KL over a posterior's width (the js fit in log rates: 0.14, in rates 0.50,
    test_fisher_coords.py). The Hessian of -KL(p_t' || p_t) in t at t = t' is -g(t') for any family:
    read by the spline, the exact limit posteriors of TASEP L = 8 give the exact metric to 0.045
    (measured; bound 0.07), while the shape fit, which pools the posteriors' curvature away from
    their own points into one F, scores 0.15 in log rates (bound: above 0.10)."""
    th, lp, inner = _tasep_limit()
    ex = tasep.exact(8, th)
    errs = {}
    for fit in ("curvature", "shape"):
        pot, _ = fit_potential(th, lp, np.arange(len(th)), PotentialConfig(fit=fit, coords="log"))
        errs[fit] = error_table(th, pot.F(th), pot.grad(th), pot.hessian(th), ex, 8, inner, "log")["metric_rel_error"]
    assert errs["curvature"] < 0.07 and errs["shape"] > 0.10, errs


def test_jax_spline_is_scipys():
    """The spline as piecewise Taylor polynomials in JAX (float32, shapefit.piecewise) against
    scipy's spline: values and first and second derivatives at random points of the box, to float32
    precision of the largest value; the metric function equals the batched Hessian."""
    rng = np.random.default_rng(0)
    a1, a2 = np.linspace(0.1, 0.9, 8), np.linspace(-0.3, 0.4, 7)
    vals = np.sin(3 * a1)[:, None] * np.cos(2 * a2)[None] + rng.normal(0, 0.1, (8, 7))
    sp = RectBivariateSpline(a1, a2, vals, kx=5, ky=5, s=0)
    params = {"F": shapefit.piecewise(sp, (5, 5)), "lin": jnp.zeros(2, jnp.float32)}
    pot = shapefit.SplinePotential(params, (5, 5), PotentialConfig(fit="shape"))
    pts = np.column_stack([rng.uniform(0.1, 0.9, 50), rng.uniform(-0.3, 0.4, 50)])
    x, y = pts.T
    np.testing.assert_allclose(pot.F(pts), sp.ev(x, y), atol=1e-5 * np.abs(vals).max())
    gr = pot.grad(pts)
    for i, kw in enumerate(({"dx": 1}, {"dy": 1})):
        want = sp.ev(x, y, **kw)
        np.testing.assert_allclose(gr[:, i], want, atol=1e-4 * np.abs(want).max())
    H = pot.hessian(pts)
    for (i, j), kw in {(0, 0): {"dx": 2}, (0, 1): {"dx": 1, "dy": 1}, (1, 1): {"dy": 2}}.items():
        want = sp.ev(x, y, **kw)
        np.testing.assert_allclose(H[:, i, j], want, atol=1e-3 * np.abs(want).max())
    met = pot.metric_fn()
    np.testing.assert_allclose(np.asarray(met(jnp.asarray(pts[3], jnp.float32))), H[3], rtol=1e-5, atol=1e-5 * np.abs(H).max())


@pytest.mark.parametrize("fit", ["shape", "curvature"])
def test_spline_potential_round_trips_through_the_saved_networks(tmp_path, fit):
    from geomjobs.fisher.outputs import load_potential, write_networks

    th, _ = grid(6, 5, (0.2, -0.2), (0.5, 0.2))
    ex = ising.exact_enumeration(4, th)
    pot, _ = fit_potential(th, limit_posteriors(ex, th), np.arange(len(th)), PotentialConfig(fit=fit))
    write_networks(str(tmp_path), {"potential": pot, "posterior_params": None})
    back = load_potential(str(tmp_path))
    assert back.cfg == pot.cfg and back.degree == (5, 4)
    np.testing.assert_array_equal(back.F(th), pot.F(th))
    np.testing.assert_array_equal(back.hessian(th), pot.hessian(th))


def test_unknown_fit_is_refused():
    with pytest.raises(ValueError, match="unknown potential fit"):
        PotentialConfig(fit="spline")


def test_folds_score_every_sample_with_a_network_that_did_not_see_it(monkeypatch):
    """posterior.folds = 3: three networks (seeds 5, 6, 7), network k trained on every point's
    samples but those in fold k (sample j is in fold j mod 3) and scoring fold k; all n samples
    come back (F is fitted on all of them)."""
    from geomjobs.fisher import method

    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(4, 9, 5)).astype(np.int8)
    thetas = rng.uniform(0.1, 0.9, size=(4, 2))
    seen = []
    real = posterior.train_posterior

    def spy(xs, cfg, grid=None):
        seen.append((xs.shape[1], cfg.seed))
        return real(xs, cfg, grid=grid)

    monkeypatch.setattr(posterior, "train_posterior", spy)
    cfg = PosteriorConfig(bundle=2, steps=3, batch=4, folds=3, seed=5)
    ll, info = method.posterior_loglik(cfg, None, x, thetas, "identity")
    assert ll.shape == (4, 9, 4) and np.allclose(np.exp(ll).sum(-1), 1, atol=1e-5)
    assert seen == [(6, 5), (6, 6), (6, 7)] and len(info["posterior_params"]) == 3
    assert list(cfg.fold_of(9)) == [0, 1, 2, 0, 1, 2, 0, 1, 2] and cfg.split(9) == 6
    # fold k's log-likelihoods are those of network k
    net = posterior.PosteriorNet(4, lattice=False, grid=tuple(tuple(float(v) for v in r) for r in thetas))
    for k in range(3):
        want = posterior.learned_loglik(net, info["posterior_params"][k], x[:, k::3])
        np.testing.assert_allclose(ll[:, k::3], want, rtol=1e-6, atol=1e-6)
