"""Geodesics of a 2-D metric by minimising the discrete path energy.

A path t_0 = a, t_1, ..., t_K = b with fixed ends; its energy is
E = sum_k D_k^T g(m_k) D_k with D_k = t_{k+1} - t_k and m_k the segment's midpoint. For fixed
ends the minimisers of E are the constant-speed geodesics (Cauchy-Schwarz: length^2 <= K E, with
equality at constant speed), so minimising E over the interior points gives a geodesic and its
length sum_k sqrt(D_k^T g(m_k) D_k). The interior points are optimised by L-BFGS-B (scipy) on
jax gradients, bounded to the box the metric was fitted on. A fitted Hessian need not be positive
definite everywhere (estimation noise at the grid's edge): the metric is used lifted
by a multiple of the identity where its smallest eigenvalue is below ``floor`` times the largest
(:func:`psd`), so the energy stays bounded below.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import minimize


@dataclass(frozen=True)
class GeodesicConfig:
    """The spec's ``geodesics`` section: ``points`` per path (ends included), and the ``pairs`` of
    end points ((a1, a2), (b1, b2)); None: the job's two diagonals of the grid box, 10 % inside."""
    points: int = 33
    pairs: tuple | None = None


def psd(g, floor: float = 1e-3):
    """g (2,2) lifted to positive definite: plus the multiple of the identity that raises its
    smallest eigenvalue to floor * the largest (nothing when it is already there); closed-form
    2 x 2 eigenvalues, differentiable, cheap to compile."""
    g = 0.5 * (g + g.T)
    m = 0.5 * (g[0, 0] + g[1, 1])
    r = jnp.sqrt(0.25 * (g[0, 0] - g[1, 1]) ** 2 + g[0, 1] ** 2 + 1e-30)
    lo, hi = m - r, m + r
    lift = jnp.maximum(floor * jnp.maximum(hi, 1e-12) - lo, 0.0)
    return g + lift * jnp.eye(2, dtype=g.dtype)


def segment_sq(metric: Callable, path):
    """D_k^T g(m_k) D_k for each segment of path (K+1, 2)."""
    d = path[1:] - path[:-1]
    mid = 0.5 * (path[1:] + path[:-1])
    g = jax.vmap(metric)(mid)
    return jnp.einsum("ki,kij,kj->k", d, g, d)


def path_length(metric: Callable, path) -> float:
    return float(jnp.sum(jnp.sqrt(jnp.maximum(segment_sq(metric, jnp.asarray(path, jnp.float32)), 0.0))))


def _energy_fn(met: Callable, n_points: int):
    """Jitted value-and-gradient of the path energy in the interior points (scaled offsets from
    the straight line), with the ends, the line and the scale as arguments: one compilation
    serves every pair of ends under one metric."""
    def energy(flat, a, b, init, scale):
        inner = flat.reshape(-1, 2) * scale + init
        path = jnp.concatenate([a[None], inner, b[None]])
        return jnp.sum(segment_sq(met, path)) * (n_points - 1)

    return jax.jit(jax.value_and_grad(energy))


def geodesic(metric: Callable, a, b, *, n_points: int = GeodesicConfig.points, bounds=None, clamp: bool = True,
             maxiter: int = 200) -> tuple[np.ndarray, float]:
    """Geodesic from a to b: (path (n_points, 2), metric length). ``metric``: t (2,) -> (2, 2),
    traceable by jax. ``bounds``: ((lo1, lo2), (hi1, hi2)) box for the interior points."""
    return geodesics(metric, [(a, b)], n_points=n_points, bounds=bounds, clamp=clamp, maxiter=maxiter)[0]


def geodesics(metric: Callable, pairs, *, n_points: int = GeodesicConfig.points, bounds=None, clamp: bool = True,
              maxiter: int = 200) -> list[tuple[np.ndarray, float]]:
    """:func:`geodesic` for each (a, b) in pairs, compiling the energy once."""
    met = (lambda t: psd(metric(t))) if clamp else metric  # noqa: E731
    vg = _energy_fn(met, n_points)
    s = np.linspace(0.0, 1.0, n_points)[:, None]
    out = []
    for a, b in pairs:
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        init = (1 - s) * a + s * b
        # optimise in units of the end-to-end span so L-BFGS sees O(1) coordinates
        scale = np.maximum(np.abs(b - a), 1e-6 + 1e-3 * np.abs(a).max())
        args = [jnp.asarray(v, jnp.float32) for v in (a, b, init[1:-1], scale)]

        def fun(flat, args=args):
            v, g = vg(jnp.asarray(flat, jnp.float32), *args)
            return float(v), np.asarray(g, np.float64)

        box = None
        if bounds is not None:
            lo, hi = np.asarray(bounds[0], float), np.asarray(bounds[1], float)
            box = list(zip(((lo - init[1:-1]) / scale).ravel(), ((hi - init[1:-1]) / scale).ravel()))
        res = minimize(fun, np.zeros(2 * (n_points - 2)), jac=True, method="L-BFGS-B", bounds=box,
                       options={"maxiter": maxiter})
        path = np.vstack([a, res.x.reshape(-1, 2) * scale + init[1:-1], b])
        out.append((path, path_length(met, path)))
    return out


def grid_metric(thetas_axes: tuple[np.ndarray, np.ndarray], g: np.ndarray) -> Callable:
    """A traceable metric from values on a grid: bilinear interpolation of g (R1, R2, 2, 2) over
    the axes (theta_1 values, theta_2 values), clamped at the edges (for exact references known
    only at the grid points)."""
    t1 = jnp.asarray(thetas_axes[0], jnp.float32)
    t2 = jnp.asarray(thetas_axes[1], jnp.float32)
    G = jnp.asarray(g, jnp.float32)

    def cell(axis, v):
        pos = jnp.clip((v - axis[0]) / (axis[-1] - axis[0]) * (axis.shape[0] - 1), 0.0, axis.shape[0] - 1.0)
        i = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, axis.shape[0] - 2)
        return i, pos - i

    def metric(t):
        i, a = cell(t1, t[0])
        j, b = cell(t2, t[1])
        return ((1 - a) * (1 - b) * G[i, j] + a * (1 - b) * G[i + 1, j]
                + (1 - a) * b * G[i, j + 1] + a * b * G[i + 1, j + 1])

    return metric
