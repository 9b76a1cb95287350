"""The log-partition function F of a 2-D family, fitted to posteriors (Lobashev et al., section 3).

For an exponential family p(x | t) = h(x) exp(<t, T(x)> - F(t)) and a bundle x_1..N drawn at t',
the posterior on a uniform grid of t tempered by 1/N is

    p(t | x_1..N)^(1/N)  ∝  exp(<t, T_bar> - F(t)),      T_bar = (1/N) sum_i T(x_i),

and T_bar -> grad F(t') as N grows (Theorem 3.1: the tempered posterior tends to exp(-D_F(t, t'))
with D_F the Bregman divergence of F = KL(p_t' || p_t)). The statistic is therefore never needed:
the model posterior implied by a candidate F is

    q_F(t | t')  ∝  exp(<t, grad F(t')> - F(t))          (normalised over the grid points)

and F is fitted by minimising the Jensen-Shannon divergence between each bundle's tempered
posterior (learned or oracle, :mod:`geomjobs.fisher.posterior`) and q_F(. | t') at the bundle's
own grid point t', averaged over bundles (the paper's loss). Only the Hessian of F is identified
(Theorem 3.2): F is returned up to an affine term a + <b, t>, which q_F cannot see.

F is per sample (the tempering by 1/N removes the bundle size), in the family's natural
parameters. The metric is ``jax.hessian`` of F. F is an MLP on the grid-normalised coordinates
u = (t - centre) / half_width in [-1, 1]^2 (so one learning rate fits any theta range) with
smooth activations: a ReLU net (the paper's) has a zero Hessian almost everywhere, and here the
metric is read from that Hessian directly.

Fitting coordinates (``coords``). The model posterior is exact only for an exponential family
whose natural parameters are the fitting coordinates u(t); otherwise (TASEP in its rates) the
tempered posterior is exp(-KL(p_t' || p_t)) and no Bregman divergence matches it over a whole
posterior's width, only to second order at t'. F is therefore fitted in coordinates u = u(t)
(``"identity"``, or ``"log"`` for positive rates), the grid posteriors being distributions over
the same grid points in either coordinates, and the metric is the tensor Hess_u F read back in t:
g(t) = J^T Hess_u F J with J = du/dt (not the Hessian of F(u(t)) in t, which has the extra term
grad_u F . d^2u/dt^2). ``Potential.hessian`` returns that g; with ``"identity"`` it is jax.hessian
of F. F is then identified up to an affine function of u.

Bias: T_bar fluctuates about grad F(t') with covariance g / N, so the tempered posteriors are
wider than exp(-D_F) by a relative O(1/N) and the fitted Hessian is low by about that much;
``fit_bundle`` (the N used here) is therefore larger than the posterior network's training bundle.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class FNet(nn.Module):
    """F(u): 2 -> depth x (width, tanh) -> 1; or, with ``convex``, an input-convex network
    (Amos, Xu and Kolter, ICML 2017) whose Hessian is positive semi-definite everywhere:

        z_1 = softplus(A_1 u + b_1),  z_k+1 = softplus(W_k z_k + A_k+1 u + b_k+1),
        F = <w, z_depth> + <a, u> + c,

    with W_k and w kept non-negative (softplus of free parameters; W_k also scaled by 1 / fan-in,
    w not: with w / width too, the fitted curvature stayed ~8x too small on the slice example).
    softplus is convex and non-decreasing, and a non-negative sum of convex functions of convex
    functions is convex, so F is convex in u. A log-partition function is convex, and a Fisher
    metric is positive semi-definite; the unconstrained net can fit noise into an indefinite
    Hessian (the diffusion slices' grey cells)."""
    width: int
    depth: int
    convex: bool = False

    @nn.compact
    def __call__(self, u):
        if not self.convex:
            h = u
            for _ in range(self.depth):
                h = jnp.tanh(nn.Dense(self.width)(h))
            return nn.Dense(1)(h)[..., 0]
        z = jax.nn.softplus(nn.Dense(self.width)(u))
        for k in range(1, self.depth):
            w = self.param(f"W_{k}", nn.initializers.normal(1.0), (self.width, self.width))
            z = jax.nn.softplus(z @ (jax.nn.softplus(w) / self.width) + nn.Dense(self.width)(u))
        w = self.param("w_out", nn.initializers.normal(1.0), (self.width,))
        return z @ jax.nn.softplus(w) + nn.Dense(1)(u)[..., 0]


# fitting coordinates u(t) and their derivative du/dt (elementwise: each axis maps on its own)
COORDS = {"identity": (lambda t: t, lambda t: jnp.ones_like(t)),
          "log": (jnp.log, lambda t: 1.0 / t)}


def to_coords(coords: str, t):
    """u(t) of the named fitting coordinates (numpy in, numpy out)."""
    if coords not in COORDS:
        raise ValueError(f"unknown fitting coordinates {coords!r} (expected one of {sorted(COORDS)})")
    t = np.asarray(t, np.float64)
    if coords == "log" and not (t > 0).all():
        raise ValueError("log fitting coordinates need every theta > 0")
    return np.asarray(COORDS[coords][0](jnp.asarray(t)), np.float64)


def coords_jacobian(coords: str, t) -> np.ndarray:
    """du_i/dt_i of the named fitting coordinates, (..., 2) (numpy)."""
    to_coords(coords, t)  # checks the name and the domain
    return np.asarray(COORDS[coords][1](jnp.asarray(np.asarray(t, np.float64))), np.float64)


# how F is fitted: "js" the paper's (this module: the network F, the statistic tied to grad F);
# "shape" the posteriors' t-dependence alone, F's grid values read by a spline; "curvature" the same F,
# the metric read from each posterior's curvature at its own point (geomjobs.fisher.shapefit)
FITS = {"js": "Jensen-Shannon fit of the network F with the statistic tied to grad F (the paper's)",
        "shape": "F's grid values from the posteriors' shapes by weighted least squares, read by a quintic spline",
        "curvature": "F as with shape; the metric minus the Hessian of each bundle's posterior at its own point (any family)"}


@dataclass(frozen=True)
class PotentialConfig:
    """The F fit (the spec's ``potential`` section): these field defaults are the job's. A small
    net: with learned posteriors (Ising L=8, TASEP L=8, 10 x 10 grids, 128 samples per point,
    dense head) width 32 / depth 2 / 800 steps gave metric errors 0.25 / 0.60 where 64 / 3 / 1500
    steps fitted the posteriors' noise (2.0 / 2.9). ``coords``: the fitting coordinates (module
    docstring); ``convex``: F an input-convex network (:class:`FNet`); ``fit``: :data:`FITS` (with
    ``shape``, steps, width, depth, lr, seed and convex are unused); ``smooth`` (fit shape /
    curvature): 0 reads F's grid values as they are; s > 0 first smooths them with a Gaussian of
    s grid cells (:func:`geomjobs.fisher.shapefit.smooth_grid`), so the metric is the true one
    averaged over that Gaussian (smoothing commutes with the Hessian) and the grid values' noise
    is damped."""
    steps: int = 800
    width: int = 32
    depth: int = 2
    lr: float = 3e-3
    seed: int = 0
    coords: str = "identity"
    convex: bool = False
    fit: str = "js"
    smooth: float = 0.0

    def __post_init__(self):
        if self.coords not in COORDS:
            raise ValueError(f"unknown fitting coordinates {self.coords!r} (expected one of {sorted(COORDS)})")
        if self.fit not in FITS:
            raise ValueError(f"unknown potential fit {self.fit!r} (expected one of {list(FITS)})")

    def net(self) -> FNet:
        return FNet(self.width, self.depth, self.convex)


@dataclass
class Potential:
    """A fitted F: ``F(t)``, ``grad(t)`` (= dF/dt) and ``hessian(t)`` (the metric, J^T Hess_u F J;
    jax.hessian of F for identity coordinates) for t of shape (..., 2). ``centre`` and
    ``half_width`` normalise the fitting coordinates u(t) to [-1, 1]^2; ``cfg`` gives the net
    (width, depth, convex) and the coordinates."""
    params: dict
    centre: np.ndarray
    half_width: np.ndarray
    cfg: PotentialConfig = PotentialConfig()

    @property
    def coords(self) -> str:
        return self.cfg.coords

    def _fu(self, params, u):
        """F as a function of the fitting coordinates u."""
        return _f_of_u(self.cfg, params, self.centre, self.half_width, u)

    def _f(self, params, t):
        return self._fu(params, COORDS[self.coords][0](t))

    def scalar(self, t):
        """F at one point t (2,) (traceable: for jax.grad / jax.hessian)."""
        return self._f(self.params, t)

    def _batched(self, which: str, t):
        fn = _batched_fns(self.cfg)[which]
        t = jnp.asarray(t, jnp.float32).reshape(-1, 2)
        return np.asarray(fn(self.params, jnp.asarray(self.centre), jnp.asarray(self.half_width), t), np.float64)

    def F(self, t):
        return self._batched("F", t)

    def grad(self, t):
        return self._batched("grad", t)

    def hessian(self, t):
        return self._batched("hessian", t)

    def metric_fn(self):
        """t (2,) -> g(t) (2, 2), traceable (for geodesics)."""
        return functools.partial(_metric, self.cfg, self.params, jnp.asarray(self.centre), jnp.asarray(self.half_width))


def _f_of_u(cfg: PotentialConfig, params, c, hw, u):
    """F at fitting coordinates u: the network on u normalised by centre ``c`` and half-width ``hw``."""
    return cfg.net().apply(params, (u - c) / hw)


def _metric(cfg: PotentialConfig, params, c, hw, t):
    """g(t) = J^T Hess_u F(u(t)) J, J = diag(du/dt)."""
    u_of, du = COORDS[cfg.coords]
    H = jax.hessian(lambda u: _f_of_u(cfg, params, c, hw, u))(u_of(t))
    j = du(t)
    return H * j[:, None] * j[None, :]


@functools.cache
def _batched_fns(cfg: PotentialConfig) -> dict:
    """Jitted F, grad F (in t), the metric over a batch of points, for one architecture (params traced)."""
    u_of = COORDS[cfg.coords][0]

    def f(params, c, hw, t):
        return _f_of_u(cfg, params, c, hw, u_of(t))

    return {"F": jax.jit(jax.vmap(f, (None, None, None, 0))),
            "grad": jax.jit(jax.vmap(jax.grad(f, argnums=3), (None, None, None, 0))),
            "hessian": jax.jit(jax.vmap(functools.partial(_metric, cfg), (None, None, None, 0)))}


def model_log_posterior(f, params, thetas):
    """log q_F(t | t') for every pair of grid points: (P, P), row t', column t."""
    Fv = jax.vmap(lambda t: f(params, t))(thetas)
    dF = jax.vmap(jax.grad(lambda t: f(params, t)))(thetas)
    logits = dF @ thetas.T - Fv[None, :]
    return jax.nn.log_softmax(logits, axis=1)


def js_divergence(logp, logq):
    """Jensen-Shannon divergence between rows of two log-probability arrays (natural log)."""
    logm = jnp.logaddexp(logp, logq) - jnp.log(2.0)
    p, q = jnp.exp(logp), jnp.exp(logq)
    return 0.5 * jnp.sum(p * (logp - logm), -1) + 0.5 * jnp.sum(q * (logq - logm), -1)


def fit_potential(thetas, log_post, point, cfg: PotentialConfig = PotentialConfig(), cells=None) -> tuple[Potential, dict]:
    """Fit F to tempered posteriors.

    thetas: (P, 2) grid points; log_post: (M, P) tempered log-posteriors of M bundles over the
    grid (each row normalised); or, with ``cells`` (M, K) (the grid indices of each bundle's
    window, :func:`geomjobs.fisher.posterior.window_cells`), (M, K) over those cells only, each
    row normalised over its window, and q_F likewise normalised over the bundle's window;
    point: (M,) the grid index each bundle was drawn at; cfg: the net,
    the fitting coordinates and the optimiser (:class:`PotentialConfig`; its defaults are the
    job's). Full-batch Adam with a cosine learning-rate decay (``cfg.fit == "shape"``:
    :func:`geomjobs.fisher.shapefit.fit_shape` instead). Returns the potential and
    {"loss": final mean JS, "loss_history": [...]}.
    """
    if cfg.fit in ("shape", "curvature"):
        from geomjobs.fisher.shapefit import fit_shape

        return fit_shape(thetas, log_post, point, cfg, cells=cells)
    thetas = np.asarray(thetas, np.float64)
    u = to_coords(cfg.coords, thetas)
    lo, hi = u.min(0), u.max(0)
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-12)
    pot = Potential(params={}, centre=centre.astype(np.float32), half_width=half.astype(np.float32), cfg=cfg)
    tj = jnp.asarray(u, jnp.float32)
    lp = jnp.asarray(log_post, jnp.float32)
    idx = jnp.asarray(point, jnp.int32)
    cj = None if cells is None else jnp.asarray(cells, jnp.int32)
    params = cfg.net().init(jax.random.PRNGKey(cfg.seed), jnp.zeros((1, 2), jnp.float32))
    opt = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.02))
    state = opt.init(params)

    def loss_fn(p):
        if cj is None:
            lq = model_log_posterior(pot._fu, p, tj)[idx]
        else:
            Fv = jax.vmap(lambda t: pot._fu(p, t))(tj)
            dF = jax.vmap(jax.grad(lambda t: pot._fu(p, t)))(tj)
            lq = jax.nn.log_softmax(jnp.einsum("mi,mki->mk", dF[idx], tj[cj]) - Fv[cj], axis=1)
        return jnp.mean(js_divergence(lp, lq))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    hist = []
    for i in range(cfg.steps):
        params, state, loss = step(params, state)
        if i % 100 == 0 or i == cfg.steps - 1:
            hist.append(float(loss))
    pot.params = params
    return pot, {"loss": hist[-1], "loss_history": hist}


def remove_affine(est: np.ndarray, ref: np.ndarray, thetas: np.ndarray, coords: str = "identity") -> np.ndarray:
    """est minus the affine function a + <b, u(t)> (u the fitting coordinates) that best fits
    est - ref (least squares): the part of an estimated F that the method cannot identify, removed
    before comparing with ref."""
    A = np.column_stack([np.ones(len(thetas)), to_coords(coords, thetas)])
    coef, *_ = np.linalg.lstsq(A, est - ref, rcond=None)
    return est - A @ coef


def error_table(thetas, F, dF, g, exact: dict, per: float, interior: np.ndarray, coords: str = "identity") -> dict:
    """The paper's Table 1 errors, in this project's stated normalisation.

    F per site (divided by ``per``, the number of sites) after removing the best affine term in
    the fitting coordinates u over the interior points; its gradient dF/dt per site after removing,
    per component, the best multiple of du_i/dt_i (the gradient of that affine term: a constant for
    identity coordinates); the metric's relative Frobenius error
    sqrt(sum ||g - g_exact||^2 / sum ||g_exact||^2) over the interior points (dominated by where
    g is large), and the median over interior points of ||g - g_exact|| / ||g_exact||.
    """
    m = interior
    Fa = remove_affine(F[m], exact["F"][m], thetas[m], coords)
    rmse_F = float(np.sqrt(np.mean(((Fa - exact["F"][m]) / per) ** 2)))
    d = (dF[m] - exact["dF"][m])
    j = coords_jacobian(coords, thetas[m])
    d = d - j * (np.sum(d * j, 0) / np.sum(j * j, 0))
    rmse_d = np.sqrt(np.mean((d / per) ** 2, axis=0))
    ge = exact["g"][m]
    rel = float(np.sqrt(np.sum((g[m] - ge) ** 2) / np.sum(ge ** 2)))
    point = np.linalg.norm(g[m] - ge, axis=(1, 2)) / np.linalg.norm(ge, axis=(1, 2))
    return {"rmse_F": rmse_F, "rmse_dF_1": float(rmse_d[0]), "rmse_dF_2": float(rmse_d[1]), "metric_rel_error": rel,
            "metric_median_rel_error": float(np.median(point))}
