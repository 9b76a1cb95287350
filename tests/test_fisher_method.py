"""The Fisher-metric method (geomjobs.fisher.{posterior,potential,geodesic}) against exact references.

The Ising references here are computed by this file's own enumeration of the 2^16 states of the
4 x 4 periodic lattice (independent of geomjobs.fisher.ising): T = (sum over the 32 bonds of
s_i s_j, sum_i s_i), log Z(t) = logsumexp <t, T>, g = Cov(T). Samples for the oracle test are
iid exact draws from the enumerated law, so the F-fitting stage is checked on its own (the
samplers are tested in test_fisher_families.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.fisher import geodesic as geo
from geomjobs.fisher import posterior, potential
from geomjobs.fisher.potential import PotentialConfig

L = 4


@pytest.fixture(scope="module")
def ising4():
    idx = np.arange(2 ** (L * L))
    s = (((idx[:, None] >> np.arange(L * L)) & 1) * 2 - 1).reshape(-1, L, L)
    bonds = (s * np.roll(s, 1, 1)).sum((1, 2)) + (s * np.roll(s, 1, 2)).sum((1, 2))
    stats = np.stack([bonds, s.sum((1, 2))], 1).astype(np.float64)

    def law(th):
        e = th @ stats.T
        mx = e.max(1, keepdims=True)
        w = np.exp(e - mx)
        z = w.sum(1, keepdims=True)
        w /= z
        mu = w @ stats
        g = np.einsum("ps,si,sj->pij", w, stats, stats) - mu[:, :, None] * mu[:, None, :]
        return {"F": mx[:, 0] + np.log(z[:, 0]), "dF": mu, "g": g, "w": w}

    return stats, law


def grid(R=12, lo=(0.1, -0.3), hi=(0.6, 0.3)):
    a1, a2 = np.linspace(lo[0], hi[0], R), np.linspace(lo[1], hi[1], R)
    th = np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)
    m = np.zeros((R, R), bool)
    m[1:-1, 1:-1] = True
    return th, m.ravel()


def test_exact_limit_posterior_gives_exact_metric(ising4):
    """Fed the N -> infinity tempered posterior exp(<t, grad F(t')> - F(t)) itself (Theorem 3.1's
    limit), the JS fit must return the exact Hessian up to the MLP's and optimiser's error alone:
    5 % relative over the interior (measured 3 % at 600 steps)."""
    _, law = ising4
    th, interior = grid()
    ex = law(th)
    logits = ex["dF"] @ th.T - ex["F"][None, :]
    lp = logits - logits.max(1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(1, keepdims=True))
    pot, info = potential.fit_potential(th, lp, np.arange(len(th)), PotentialConfig(steps=600, width=64, depth=3))
    err = potential.error_table(th, pot.F(th), pot.grad(th), pot.hessian(th), ex, L * L, interior)
    assert err["metric_rel_error"] < 0.05, err
    assert info["loss"] < 1e-3


def test_oracle_posterior_ising4_recovers_covariance(ising4):
    """Oracle posterior (exact log-likelihoods) on 512 iid exact samples per point of a 12 x 12
    grid of (beta, h) in [0.1, 0.6] x [-0.3, 0.3]: the fitted Hessian equals Cov(T) to 12 %
    (relative Frobenius over the interior; measured 6 %). The error is the sampling noise of the
    bundle-mean statistic (std sqrt(g / 512) ~ 0.3 against a change of grad F of ~2.3 per grid
    cell) smoothed by the MLP; the 1/N bias of tempering is 0.2 % here. Edge points are excepted:
    there the posteriors and q_F are cut off by the grid on one side, so F's curvature is pinned
    from one side only (their pointwise error is several times the interior's)."""
    stats, law = ising4
    th, interior = grid()
    ex = law(th)
    rng = np.random.default_rng(0)
    n = 512
    draws = np.stack([rng.choice(len(stats), n, p=ex["w"][p]) for p in range(len(th))])
    loglik = stats[draws] @ th.T - ex["F"][None, None, :]          # (P, n, P): exact log p(x | t)
    lp, pts = posterior.bundle_posteriors(loglik, n, 1, seed=0)
    pot, _ = potential.fit_potential(th, lp, pts, PotentialConfig(steps=600, width=64, depth=3))
    g = pot.hessian(th)
    err = potential.error_table(th, pot.F(th), pot.grad(th), g, ex, L * L, interior)
    assert err["metric_rel_error"] < 0.12, err
    assert err["rmse_F"] < 2e-3 and max(err["rmse_dF_1"], err["rmse_dF_2"]) < 2e-2, err
    # the estimate is not a trivial constant: it follows the exact metric's variation over the grid
    r = np.corrcoef(g[interior, 1, 1], ex["g"][interior, 1, 1])[0, 1]
    assert r > 0.9, r


def test_bundle_posteriors_are_tempered_sums():
    rng = np.random.default_rng(1)
    ll = rng.normal(size=(3, 8, 3))
    lp, pts = posterior.bundle_posteriors(ll, 8, 5, seed=0)
    assert lp.shape == (3, 3) and list(pts) == [0, 1, 2]           # size == m: each point once
    want = ll.mean(1)
    want = want - np.log(np.exp(want).sum(1, keepdims=True))
    np.testing.assert_allclose(lp, want, atol=1e-12)
    lp, pts = posterior.bundle_posteriors(ll, 4, 5, seed=0)
    assert lp.shape == (15, 3) and np.allclose(np.exp(lp).sum(1), 1)


@pytest.mark.parametrize("convex", [False, True])
def test_hessian_matches_finite_differences(convex):
    """jax.hessian of a (random, untrained) F against central differences of jax.grad. float32:
    truncation h^2 |F'''| / 6 ~ 2e-5 and rounding eps |grad F| / h ~ 1e-5 (in grid units, h = 1e-2),
    so 2e-3 of the largest entry is a wide bound that a wrong Hessian (transposed, missing the
    coordinate scaling) would still fail."""
    th, _ = grid(5)
    cfg = PotentialConfig(width=64, depth=3, convex=convex)
    params = cfg.net().init(jax.random.PRNGKey(3), jnp.zeros((1, 2)))
    pot = potential.Potential(params, np.array([0.35, 0.0], np.float32), np.array([0.25, 0.3], np.float32), cfg)
    H = pot.hessian(th)
    for i, step in enumerate(1e-2 * pot.half_width):
        e = np.zeros(2)
        e[i] = step
        col = (pot.grad(th + e) - pot.grad(th - e)) / (2 * step)
        np.testing.assert_allclose(H[:, :, i], col, atol=2e-3 * np.abs(H).max())
    assert np.abs(H[:, 0, 1] - H[:, 1, 0]).max() < 1e-5 * np.abs(H).max()


def test_convex_potential_has_positive_semidefinite_metric_everywhere():
    # the input-convex F: at 400 random points of [-2, 2]^2 (twice the grid box) for 10 random
    # initialisations, both Hessian eigenvalues are >= 0 (float32 rounding: -1e-5 of the largest).
    # Power: the unconstrained tanh F of the same seeds has clearly negative eigenvalues.
    u = np.random.default_rng(0).uniform(-2, 2, (400, 2))
    c, hw = np.zeros(2, np.float32), np.ones(2, np.float32)
    worst = {}
    for convex in (True, False):
        lo = []
        for seed in range(10):
            cfg = PotentialConfig(width=32, depth=2, convex=convex)
            params = cfg.net().init(jax.random.PRNGKey(seed), jnp.zeros((1, 2)))
            ev = np.linalg.eigvalsh(potential.Potential(params, c, hw, cfg).hessian(u))
            lo.append(ev.min() / np.abs(ev).max())
        worst[convex] = min(lo)
    assert worst[True] >= -1e-5, worst
    assert worst[False] < -0.1, worst


def test_convex_flag_round_trips_through_the_saved_networks(tmp_path):
    from geomjobs.fisher.outputs import load_potential, write_networks

    cfg = PotentialConfig(width=16, depth=3, convex=True)
    params = cfg.net().init(jax.random.PRNGKey(1), jnp.zeros((1, 2)))
    pot = potential.Potential(params, np.array([0.3, 0.1], np.float32), np.array([0.2, 0.4], np.float32), cfg)
    write_networks(str(tmp_path), {"potential": pot, "posterior_params": None})
    back = load_potential(str(tmp_path))
    assert back.cfg == cfg
    th, _ = grid(4)
    np.testing.assert_array_equal(back.F(th), pot.F(th))


def test_geodesic_straight_for_constant_metric():
    G = jnp.array([[2.0, 0.7], [0.7, 1.0]])
    a, b = np.array([0.0, 0.0]), np.array([1.0, 2.0])
    path, length = geo.geodesic(lambda t: G, a, b, n_points=17)
    line = np.linspace(0, 1, 17)[:, None] * (b - a) + a
    np.testing.assert_allclose(path, line, atol=1e-4)
    d = b - a
    assert length == pytest.approx(float(np.sqrt(d @ np.asarray(G) @ d)), rel=1e-5)


def test_geodesic_of_curved_metric_is_exact_and_shorter():
    """g = Hess(e^t1 + e^t2) = diag(e^t1, e^t2): in u_i = 2 e^(t_i / 2) it is Euclidean, so the
    geodesic is the straight line in u (constant speed) and its length |u(b) - u(a)|. The discrete
    path (33 points, midpoint rule) must match within 1 % of the span and be shorter than the
    straight line in t."""
    def metric(t):
        return jnp.diag(jnp.exp(t))

    a, b = np.array([0.0, 2.0]), np.array([2.0, 0.0])
    path, length = geo.geodesic(metric, a, b, n_points=33)
    u = lambda t: 2 * np.exp(np.asarray(t) / 2)  # noqa: E731
    exact_len = np.linalg.norm(u(b) - u(a))
    assert length == pytest.approx(exact_len, rel=2e-3)
    s = np.linspace(0, 1, 33)[:, None]
    exact_path = 2 * np.log(((1 - s) * u(a) + s * u(b)) / 2)
    assert np.abs(path - exact_path).max() < 0.01 * np.linalg.norm(b - a)
    line = (1 - s) * a + s * b
    straight = geo.path_length(metric, line)
    assert length < 0.98 * straight, (length, straight)   # measured 3.6 % shorter


def test_grid_metric_interpolates():
    a1, a2 = np.linspace(0, 1, 4), np.linspace(0, 2, 5)
    T1, T2 = np.meshgrid(a1, a2, indexing="ij")
    g = np.zeros((4, 5, 2, 2))
    g[..., 0, 0] = 1 + T1 + 2 * T2          # bilinear fields are reproduced exactly
    g[..., 1, 1] = 3 - T1
    m = geo.grid_metric((a1, a2), g)
    v = np.asarray(m(jnp.array([0.4, 1.3])))
    assert v[0, 0] == pytest.approx(1 + 0.4 + 2.6, rel=1e-5) and v[1, 1] == pytest.approx(2.6, rel=1e-5)
