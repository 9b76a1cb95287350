"""F from the shapes of the tempered posteriors (``potential.fit: shape``), read by a spline.

For an exponential family, a bundle's tempered posterior over the grid is exactly

    log p_m(t_p) = <u_p, a_m> - F(u_p) - c_m,          a_m = T_bar of bundle m,

with u the fitting coordinates. The paper's fit (:func:`geomjobs.fisher.potential.fit_potential`,
``fit: js``) ties a_m to grad F at the bundle's own grid point, so the sampling noise of T_bar
(covariance g / N) enters F's gradient field and, one derivative further, the metric: with the
exact likelihood on the Ising L = 4 check (9 x 9 grid, 64 samples per point) that is an error of
0.18. The t-dependence of the posterior, however, is -F(u) itself, with no noise when the
likelihood is exact. This fit leaves a_m and c_m free per bundle and solves for F's values on the
grid by weighted least squares,

    min_F  sum_m sum_p w_mp (log p_m(t_p) + F_p - <u_p, a_m> - c_m)^2,     w_mp = p_m(t_p),

which is quadratic in F once each bundle's (a_m, c_m) is eliminated (a weighted regression of
log p_m + F on (1, u)): a P x P linear system, exact for the exact likelihood, determined up to an
affine function of u (fixed here by taking F orthogonal to (1, u) and then adding the linear term
that best matches the bundles' a_m to grad F at their grid points, so grad F is E[T] as in the js
fit). The weights put each bundle's equations where its posterior has mass.

Reading the metric off grid values: second differences at the grid step are O(h^2) (6.5 % on that
Ising grid, from the exact log Z), a cubic spline 5 %; the quintic interpolating spline (scipy's
``RectBivariateSpline``, k = 5, not-a-knot) is O(h^4): 0.8 %. So F is that spline of the grid
values in u (degree min(5, R - 1) per axis for coarse grids), and the metric
is J^T Hess_u F J as for the network. (The spline is evaluated in JAX as piecewise Taylor
polynomials, :func:`piecewise`, so that its gradient, Hessian and the metric are traceable, for
the geodesics.)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.fisher.potential import COORDS, PotentialConfig, to_coords


def grid_values(u: np.ndarray, log_post: np.ndarray, point: np.ndarray, cells=None) -> tuple[np.ndarray, np.ndarray]:
    """F at the grid points u (P, 2) from tempered log-posteriors (M, P) of bundles drawn at grid
    indices ``point`` (M,): the weighted least-squares fit (module docstring), gauge fixed so that
    grad F best matches the bundles' linear terms. Returns (F (P,), a (M, 2): each bundle's fitted
    linear term, the estimate of its T_bar). With ``cells`` (M, K), log_post (M, K) over each
    bundle's window: :func:`_window_values` (a sparse system)."""
    if cells is not None:
        return _window_values(u, log_post, np.asarray(cells))
    X = np.column_stack([np.ones(len(u)), u])                # (P, 3): the affine functions of u
    lp = np.asarray(log_post, np.float64)
    w = np.exp(lp)                                           # (M, P) posterior mass
    # with W = diag(w_m) and R = I - X (X^T W X)^-1 X^T W (removing the weighted affine fit):
    # sum_m R^T W R = sum_m W - V S^-1 V^T, V = W X, S = X^T W X; and b = sum_m R^T W R lp_m
    V = w[:, :, None] * X[None]                              # (M, P, 3)
    Y = np.einsum("mpi,mij->mpj", V, np.linalg.inv(np.einsum("mpi,pj->mij", V, X)))
    A = np.diag(w.sum(0)) - np.tensordot(Y, V, axes=([0, 2], [0, 2]))
    b = (w * lp).sum(0) - np.einsum("mpj,mj->p", Y, np.einsum("mqj,mq->mj", V, lp))
    # A's null space is the affine functions (R X = 0), and b is orthogonal to it: adding X X^T
    # makes the system regular and picks the solution orthogonal to (1, u)
    F = np.linalg.solve(A + np.trace(A) / len(u) * X @ X.T / len(u), -b)
    coef = np.einsum("mpj,mp->mj", Y, lp + F[None])          # each bundle's weighted fit of lp_m + F on (1, u)
    return F, coef[:, 1:]


def _window_values(u, log_post, cells, chunk_floats: float = 5e6) -> tuple[np.ndarray, np.ndarray]:
    """:func:`grid_values` with each bundle's equations on its window's cells only. Each bundle
    adds a K x K block to the P x P system, so the system is sparse (a band of the windows' reach)
    and is solved by sparse LU: O(M K^2) to build, not O(M P^2). The affine gauge is fixed by
    holding F = 0 at three grid corners (the deleted equations hold by consistency: b is
    orthogonal to the affine null space), then F is made orthogonal to (1, u) as the dense fit's.
    With every window the whole grid it is the dense fit (tests/test_fisher_window.py)."""
    import scipy.sparse as sps
    from scipy.sparse.linalg import spsolve

    P, (M, K) = len(u), cells.shape
    X = np.column_stack([np.ones(P), u])
    lp = np.asarray(log_post, np.float64)
    w = np.exp(lp)
    A = sps.csr_matrix((P, P))
    b = np.zeros(P)
    coefY = np.empty((M, K, 3))
    step = max(1, int(chunk_floats // (K * K)))
    for lo in range(0, M, step):
        sl = slice(lo, lo + step)
        c, wc, lc = cells[sl], w[sl], lp[sl]
        Xc = X[c]                                               # (m, K, 3)
        V = wc[..., None] * Xc
        # pinv: a posterior with its mass on fewer than 3 non-collinear cells leaves (a_m, c_m)
        # undetermined; the minimum-norm fit is as good as any (the residual is the same)
        Y = np.einsum("mki,mij->mkj", V, np.linalg.pinv(np.einsum("mki,mkj->mij", V, Xc), hermitian=True))
        coefY[sl] = Y
        blocks = -np.einsum("mki,mli->mkl", Y, V)
        rows = np.broadcast_to(c[:, :, None], blocks.shape).ravel()
        cols = np.broadcast_to(c[:, None, :], blocks.shape).ravel()
        A = A + sps.csr_matrix((blocks.ravel(), (rows, cols)), shape=(P, P))
        bl = wc * lc - np.einsum("mkj,mj->mk", Y, np.einsum("mkj,mk->mj", V, lc))
        np.add.at(b, c.ravel(), bl.ravel())
    A = A + sps.diags(np.bincount(cells.ravel(), weights=w.ravel(), minlength=P))
    R2 = len(np.unique(u[:, 1]))
    pin = np.array([0, R2 - 1, P - R2])                          # three corners: X[pin] is invertible
    keep = np.setdiff1d(np.arange(P), pin)
    F = np.zeros(P)
    F[keep] = spsolve(A.tocsr()[keep][:, keep].tocsc(), -b[keep])
    F -= X @ np.linalg.lstsq(X, F, rcond=None)[0]
    coef = np.einsum("mkj,mk->mj", coefY, lp + F[cells])
    return F, coef[:, 1:]


def _axes(u: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The rectilinear grid's axes in u (theta_1 index major) and its shape."""
    a1, a2 = np.unique(u[:, 0]), np.unique(u[:, 1])
    if len(a1) * len(a2) != len(u):
        raise ValueError("the shape fit needs a rectilinear grid (theta_1 index major)")
    return a1, a2, (len(a1), len(a2))


def piecewise(sp, k: tuple[int, int]) -> dict:
    """A scipy ``RectBivariateSpline`` of degrees k as piecewise polynomials: its breakpoints ``bx``,
    ``by`` (the distinct knots over its domain) and, per cell, the coefficients about the cell's
    midpoint, s = sum_ab C[i, j, a, b] (x - mid_i)^a (y - mid_j)^b, solved from the spline's values
    at (k_x + 1) x (k_y + 1) Chebyshev points of the cell (exact: the spline is one polynomial of
    degree (k_x, k_y) in each cell). Evaluating that in JAX is one gather and a small polynomial,
    cheap to compile and to differentiate (float32)."""
    tx, ty = (np.unique(t) for t in sp.get_knots())       # the breakpoints (the end knots are repeated)

    def nodes(b, kk):
        mid, half = (b[1:] + b[:-1]) / 2, (b[1:] - b[:-1]) / 2
        z = np.cos(np.pi * (2 * np.arange(kk + 1) + 1) / (2 * kk + 2))
        pts = mid[:, None] + half[:, None] * z[None]                       # (cells, kk + 1)
        V = (half[:, None, None] * z[None, :, None]) ** np.arange(kk + 1)  # (cells, node, power)
        return pts, np.linalg.inv(V)

    px, ix = nodes(tx, k[0])
    py, iy = nodes(ty, k[1])
    # the spline on the grid of every cell's nodes, sorted (cells do not overlap, so per cell in
    # the order ox = argsort(z)): S[cell_x, sorted node, cell_y, sorted node]
    S = sp(np.sort(px.ravel()), np.sort(py.ravel())).reshape(len(tx) - 1, k[0] + 1, len(ty) - 1, k[1] + 1)
    ox, oy = np.argsort(px[0]), np.argsort(py[0])
    C = np.einsum("iam,imjn,jbn->ijab", ix[:, :, ox], S, iy[:, :, oy])
    return {"bx": jnp.asarray(tx, jnp.float32), "by": jnp.asarray(ty, jnp.float32), "C": jnp.asarray(C, jnp.float32)}


def _piece(pp: dict, t):
    """The piecewise polynomial ``pp`` (:func:`piecewise`) at one point t (2,), clamped to its box."""
    bx, by, C = pp["bx"], pp["by"], pp["C"]
    x = jnp.clip(t[0], bx[0], bx[-1])
    y = jnp.clip(t[1], by[0], by[-1])
    i = jnp.clip(jnp.searchsorted(bx, x, side="right") - 1, 0, bx.shape[0] - 2)
    j = jnp.clip(jnp.searchsorted(by, y, side="right") - 1, 0, by.shape[0] - 2)
    dx, dy = x - (bx[i] + bx[i + 1]) / 2, y - (by[j] + by[j + 1]) / 2
    px = dx ** jnp.arange(C.shape[2], dtype=C.dtype)
    py = dy ** jnp.arange(C.shape[3], dtype=C.dtype)
    return px @ C[i, j] @ py


def spline_f(params: dict, u):
    """F at one point u (2,) of the fitting coordinates: the spline plus the linear term."""
    return _piece(params["F"], u) + params["lin"] @ u


@dataclass
class SplinePotential:
    """A fitted F as a tensor-product spline in the fitting coordinates (``fit: shape``), with the
    interface of :class:`geomjobs.fisher.potential.Potential`: ``F``, ``grad`` (dF/dt),
    ``hessian`` (the metric J^T Hess_u F J) for t of shape (..., 2), ``metric_fn``, ``scalar``.
    ``params``: ``F`` the spline of F in u (:func:`piecewise`), ``lin`` the linear term, and with
    ``fit: curvature`` ``g11``, ``g12``, ``g22`` the splines of the metric's components in theta;
    ``degree`` the splines' per axis."""
    params: dict
    degree: tuple[int, int]
    cfg: PotentialConfig

    @property
    def coords(self) -> str:
        return self.cfg.coords

    def scalar(self, t):
        return spline_f(self.params, COORDS[self.coords][0](t))

    def _batched(self, which: str, t):
        t = jnp.asarray(t, jnp.float32).reshape(-1, 2)
        fn = _batched_fns(self.coords)[which]
        return np.asarray(fn(self.params, t), np.float64)

    def F(self, t):
        return self._batched("F", t)

    def grad(self, t):
        return self._batched("grad", t)

    def hessian(self, t):
        return self._batched("hessian", t)

    def metric_fn(self):
        return functools.partial(_metric, self.coords, self.params)


def _metric(coords: str, params, t):
    """The metric at t (2,): with ``fit: curvature`` the splines of its components over the grid
    in theta; otherwise J^T Hess_u F J."""
    if "g11" in params:
        g11, g12, g22 = (_piece(params[c], t) for c in ("g11", "g12", "g22"))
        return jnp.stack([jnp.stack([g11, g12]), jnp.stack([g12, g22])])
    u_of, du = COORDS[coords]
    H = jax.hessian(lambda u: spline_f(params, u))(u_of(t))
    j = du(t)
    return H * j[:, None] * j[None, :]


def _derivative_matrices(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(D1, D2): first and second derivatives at the nodes x of the degree-k interpolating spline
    (not-a-knot) of values at x, as matrices acting on those values."""
    from scipy.interpolate import make_interp_spline

    D1, D2 = np.zeros((len(x), len(x))), np.zeros((len(x), len(x)))
    for i in range(len(x)):
        sp = make_interp_spline(x, np.eye(len(x))[i], k=k)
        D1[:, i], D2[:, i] = sp(x, 1), sp(x, 2)
    return D1, D2


def bundle_curvature(thetas, log_post, point, cells=None) -> np.ndarray:
    """The metric at each grid point as minus the Hessian in theta of its bundles' tempered
    log-posteriors at that point (averaged over its bundles), each read by the interpolating
    spline of degree min(5, R - 1) per axis of the log-posterior's grid values: (P, 2, 2).

    The tempered log-posterior of a bundle drawn at t' is (1/N) sum_i log p(x_i | t) + const, whose
    Hessian at t' is minus the observed information, -> -g(t') as N grows; in the N -> infinity
    limit it is -KL(p_t' || p_t), whose Hessian at t = t' is -g(t') for any family. So this reads
    the Fisher metric without assuming an exponential family in any coordinates (the js and shape
    fits need one: TASEP's exact limit posteriors give 0.14 / 0.15 with them in log rates, 0.045
    here). For an exponential family it is the Hessian of F, as the shape fit's. With ``cells``
    (M, K) and log_post (M, K) over each bundle's window: the spline of the window's values
    (:func:`_window_curvature`)."""
    thetas = np.asarray(thetas, np.float64)
    a1, a2, shape = _axes(thetas)
    if cells is not None:
        return _window_curvature(thetas, (a1, a2), np.asarray(log_post, np.float64), np.asarray(point), np.asarray(cells))
    (d1, e1), (d2, e2) = (_derivative_matrices(a, min(5, len(a) - 1)) for a in (a1, a2))
    i1, i2 = np.eye(shape[0]), np.eye(shape[1])
    ops = (np.kron(e1, i2), np.kron(d1, d2), np.kron(i1, e2))          # d11, d12, d22 on theta_1-major values
    lp = np.asarray(log_post, np.float64)
    pts = np.asarray(point)
    h = np.stack([np.einsum("mq,mq->m", op[pts], lp) for op in ops], 1)   # (M, 3) at each bundle's own point
    acc = np.zeros((len(thetas), 3))
    np.add.at(acc, pts, -h)
    acc /= np.maximum(np.bincount(pts, minlength=len(thetas)), 1)[:, None]
    return np.stack([np.stack([acc[:, 0], acc[:, 1]], -1), np.stack([acc[:, 1], acc[:, 2]], -1)], -2)


def _window_curvature(thetas, axes, lp, pts, cells) -> np.ndarray:
    """:func:`bundle_curvature` on windows: each bundle's log-posterior on its w1 x w2 block of
    cells, read by the interpolating spline of degree min(5, w - 1) per axis through the block's
    nodes, its second derivatives taken at the bundle's own point."""
    a1, a2 = axes
    R2 = len(a2)
    r, c = np.divmod(cells, R2)
    w1, w2 = len(np.unique(r[0])), len(np.unique(c[0]))
    s1, s2 = r.min(1), c.min(1)
    o1, o2 = np.divmod(pts, R2)
    o1, o2 = o1 - s1, o2 - s2                                  # the own point's place in its block
    L = lp.reshape(len(lp), w1, w2)

    def rows(a, w, starts, own):
        """(first, second) derivative rows at the own node of the block spline, per bundle."""
        cache = {st: _derivative_matrices(a[st:st + w], min(5, w - 1)) for st in np.unique(starts)}
        return (np.stack([cache[st][0][o] for st, o in zip(starts, own)]),
                np.stack([cache[st][1][o] for st, o in zip(starts, own)]))

    (d1, e1), (d2, e2) = rows(a1, w1, s1, o1), rows(a2, w2, s2, o2)
    m = np.arange(len(lp))
    h11 = np.einsum("ma,ma->m", e1, L[m, :, o2])
    h22 = np.einsum("mb,mb->m", e2, L[m, o1, :])
    h12 = np.einsum("ma,mab,mb->m", d1, L, d2)
    acc = np.zeros((len(thetas), 3))
    np.add.at(acc, pts, -np.stack([h11, h12, h22], 1))
    acc /= np.maximum(np.bincount(pts, minlength=len(thetas)), 1)[:, None]
    return np.stack([np.stack([acc[:, 0], acc[:, 1]], -1), np.stack([acc[:, 1], acc[:, 2]], -1)], -2)


@functools.cache
def _batched_fns(coords: str) -> dict:
    u_of = COORDS[coords][0]

    def f(params, t):
        return spline_f(params, u_of(t))

    return {"F": jax.jit(jax.vmap(f, (None, 0))), "grad": jax.jit(jax.vmap(jax.grad(f, argnums=1), (None, 0))),
            "hessian": jax.jit(jax.vmap(functools.partial(_metric, coords), (None, 0)))}


def smooth_grid(u: np.ndarray, F: np.ndarray, sigma: float) -> np.ndarray:
    """Grid values F (R1, R2) convolved with a Gaussian of ``sigma`` cells per axis. The best
    quadratic in u is taken out first and added back, so a quadratic F (a constant metric) is
    unchanged up to the edges; the rest is filtered with reflection at the edges. Inside the grid
    the Hessian of the result is the Hessian of F averaged over the Gaussian."""
    from scipy.ndimage import gaussian_filter

    x, y = u[:, 0], u[:, 1]
    Q = np.column_stack([np.ones(len(u)), x, y, x * x, x * y, y * y])
    coef = np.linalg.lstsq(Q, F.ravel(), rcond=None)[0]
    quad = (Q @ coef).reshape(F.shape)
    return quad + gaussian_filter(F - quad, sigma, mode="reflect")


def fit_shape(thetas, log_post, point, cfg: PotentialConfig, cells=None, values=None) -> tuple[SplinePotential, dict]:
    """``fit_potential`` for ``cfg.fit == "shape"``: F's grid values (:func:`grid_values`), their
    interpolating spline in u (degree min(5, R - 1) per axis), the linear term that matches the
    bundles' T_bar estimates to grad F. Returns (potential, {"loss": the weighted RMS residual of
    the log-posteriors, "loss_history": [it]}). ``cells``: log_post over each bundle's window
    (:func:`geomjobs.fisher.potential.fit_potential`); ``values``: (F, a) of :func:`grid_values`
    on the same posteriors when already computed (to try several ``smooth`` on one solve)."""
    from scipy.interpolate import RectBivariateSpline

    thetas = np.asarray(thetas, np.float64)
    u = to_coords(cfg.coords, thetas)
    a1, a2, shape = _axes(u)
    order = np.lexsort((u[:, 1], u[:, 0]))
    if not np.array_equal(order, np.arange(len(u))):
        raise ValueError("the shape fit needs the grid points theta_1 index major")
    F, a = grid_values(u, log_post, point, cells) if values is None else values
    k = (min(5, shape[0] - 1), min(5, shape[1] - 1))
    Fs = smooth_grid(u, F.reshape(shape), cfg.smooth) if cfg.smooth > 0 else F.reshape(shape)
    sp = RectBivariateSpline(a1, a2, Fs, kx=k[0], ky=k[1], s=0)
    params = {"F": piecewise(sp, k), "lin": jnp.zeros(2, jnp.float32)}
    pot = SplinePotential(params, k, cfg)
    # the gauge: grad_u F at each bundle's grid point plus lin best matches its linear term a_m
    pts = np.asarray(point)
    gu = np.column_stack([sp.ev(u[pts, 0], u[pts, 1], dx=1), sp.ev(u[pts, 0], u[pts, 1], dy=1)])
    params["lin"] = jnp.asarray((a - gu).mean(0), jnp.float32)
    if cfg.fit == "curvature":
        # the metric's components: splines over the grid in theta (the same degrees)
        g = bundle_curvature(thetas, log_post, point, cells)
        b1, b2, _ = _axes(thetas)
        for name, (i, j) in {"g11": (0, 0), "g12": (0, 1), "g22": (1, 1)}.items():
            params[name] = piecewise(RectBivariateSpline(b1, b2, g[:, i, j].reshape(shape), kx=k[0], ky=k[1], s=0), k)
    X = np.column_stack([np.ones(len(u)), u])
    lp = np.asarray(log_post, np.float64)
    w = np.exp(lp)
    if cells is None:
        fitted = np.column_stack([np.zeros(len(a)), a]) @ X.T    # <u_p, a_m>, up to each bundle's constant
        r = lp + F[None] - fitted
    else:
        r = lp + F[np.asarray(cells)] - np.einsum("mj,mkj->mk", a, u[np.asarray(cells)])
    r -= (w * r).sum(1, keepdims=True) / w.sum(1, keepdims=True)
    res = (w * r * r).sum(1)
    loss = float(np.sqrt(np.mean(res)))
    return pot, {"loss": loss, "loss_history": [loss]}
