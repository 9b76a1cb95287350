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
    """F(u): 2 -> depth x (width, tanh) -> 1."""
    width: int = 64
    depth: int = 3

    @nn.compact
    def __call__(self, u):
        h = u
        for _ in range(self.depth):
            h = jnp.tanh(nn.Dense(self.width)(h))
        return nn.Dense(1)(h)[..., 0]


@dataclass
class Potential:
    """A fitted F in natural coordinates: ``F(t)``, ``grad(t)``, ``hessian(t)`` for t of shape (..., 2)."""
    params: dict
    centre: np.ndarray
    half_width: np.ndarray
    width: int = 64
    depth: int = 3

    def _f(self, params, t):
        return FNet(self.width, self.depth).apply(params, (t - self.centre) / self.half_width)

    def scalar(self, t):
        """F at one point t (2,) (traceable: for jax.grad / jax.hessian)."""
        return self._f(self.params, t)

    def _batched(self, which: str, t):
        fn = _batched_fns(self.width, self.depth)[which]
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
        return jax.hessian(self.scalar)


@functools.cache
def _batched_fns(width: int, depth: int) -> dict:
    """Jitted F, grad F, Hess F over a batch of points, for one architecture (params traced)."""
    def f(params, c, hw, t):
        return FNet(width, depth).apply(params, (t - c) / hw)

    return {"F": jax.jit(jax.vmap(f, (None, None, None, 0))),
            "grad": jax.jit(jax.vmap(jax.grad(f, argnums=3), (None, None, None, 0))),
            "hessian": jax.jit(jax.vmap(jax.hessian(f, argnums=3), (None, None, None, 0)))}


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


def fit_potential(thetas, log_post, point, *, steps: int = 3000, lr: float = 3e-3, width: int = 64,
                  depth: int = 3, seed: int = 0) -> tuple[Potential, dict]:
    """Fit F to tempered posteriors.

    thetas: (P, 2) grid points; log_post: (M, P) tempered log-posteriors of M bundles over the
    grid (each row normalised); point: (M,) the grid index each bundle was drawn at.
    Full-batch Adam with a cosine learning-rate decay. Returns the potential and
    {"loss": final mean JS, "loss_history": [...]}.
    """
    thetas = np.asarray(thetas, np.float64)
    lo, hi = thetas.min(0), thetas.max(0)
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 1e-12)
    pot = Potential(params={}, centre=centre.astype(np.float32), half_width=half.astype(np.float32), width=width, depth=depth)
    tj = jnp.asarray(thetas, jnp.float32)
    lp = jnp.asarray(log_post, jnp.float32)
    idx = jnp.asarray(point, jnp.int32)
    params = FNet(width, depth).init(jax.random.PRNGKey(seed), jnp.zeros((1, 2), jnp.float32))
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.02))
    state = opt.init(params)

    def loss_fn(p):
        lq = model_log_posterior(pot._f, p, tj)[idx]
        return jnp.mean(js_divergence(lp, lq))

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    hist = []
    for i in range(steps):
        params, state, loss = step(params, state)
        if i % 100 == 0 or i == steps - 1:
            hist.append(float(loss))
    pot.params = params
    return pot, {"loss": hist[-1], "loss_history": hist}


def remove_affine(est: np.ndarray, ref: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """est minus the affine function a + <b, t> that best fits est - ref (least squares): the part
    of an estimated F that the method cannot identify, removed before comparing with ref."""
    A = np.column_stack([np.ones(len(thetas)), thetas])
    coef, *_ = np.linalg.lstsq(A, est - ref, rcond=None)
    return est - A @ coef


def error_table(thetas, F, dF, g, exact: dict, per: float, interior: np.ndarray) -> dict:
    """The paper's Table 1 errors, in this project's stated normalisation.

    F per site (divided by ``per``, the number of sites) after removing the best affine term over
    the interior points; its gradient per site after removing the best constant vector (the
    gradient of that affine term); the metric's relative Frobenius error
    sqrt(sum ||g - g_exact||^2 / sum ||g_exact||^2) over the interior points.
    """
    m = interior
    Fa = remove_affine(F[m], exact["F"][m], thetas[m])
    rmse_F = float(np.sqrt(np.mean(((Fa - exact["F"][m]) / per) ** 2)))
    d = (dF[m] - exact["dF"][m])
    d = d - d.mean(0)
    rmse_d = np.sqrt(np.mean((d / per) ** 2, axis=0))
    ge = exact["g"][m]
    rel = float(np.sqrt(np.sum((g[m] - ge) ** 2) / np.sum(ge ** 2)))
    return {"rmse_F": rmse_F, "rmse_dF_1": float(rmse_d[0]), "rmse_dF_2": float(rmse_d[1]), "metric_rel_error": rel}
