"""The data the zoo DDPM (``ddpm-gmm2d``) is trained on, how its samples are scored, and its
ancestral sampler: an equal-weight mixture of isotropic Gaussians at points on a circle."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.generators.ddpm import EpsMLP


def gmm_modes(n_modes: int = 8, radius: float = 4.0) -> np.ndarray:
    """Mode centres: n_modes points evenly spaced on a circle, the first at angle 0."""
    ang = 2 * np.pi * np.arange(n_modes) / n_modes
    return (radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)).astype(np.float32)


def gmm_data(n: int, seed: int = 0, n_modes: int = 8, radius: float = 4.0, std: float = 0.3) -> np.ndarray:
    """n points from the equal-weight mixture of isotropic Gaussians (std ``std``) at :func:`gmm_modes`."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, n_modes, size=n)
    return (gmm_modes(n_modes, radius)[k] + std * rng.standard_normal((n, 2))).astype(np.float32)


def mode_stats(x: np.ndarray, modes: np.ndarray, radius: float = 1.0) -> dict:
    """Fraction of points within ``radius`` of their nearest mode, and each mode's share of all points."""
    d = np.linalg.norm(np.asarray(x)[:, None, :] - modes[None], axis=-1)
    nearest = d.argmin(axis=1)
    near = d.min(axis=1) <= radius
    share = np.array([np.mean(near & (nearest == i)) for i in range(len(modes))])
    return {"frac_near": float(near.mean()), "mode_share": share.tolist(), "min_mode_share": float(share.min())}


def sample(module: EpsMLP, params, meta: dict, n: int, seed: int = 0) -> np.ndarray:
    """n ancestral DDPM samples (Ho et al. 2020, Algorithm 2), shape (n, data_dim), float32.

    x_{T-1} ~ N(0, I); for t = T-1..0: x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(alpha_t)
    + sigma_t z with the posterior variance sigma_t^2 = beta_t (1 - abar_{t-1}) / (1 - abar_t), and no
    noise on the last step.
    """
    sched = meta["schedule"]
    T = int(sched["T"])
    b64 = diffusion.betas("linear", T, sched["beta_start"], sched["beta_end"])
    ab64 = diffusion.abar(betas=b64)
    ab_prev = np.concatenate([[1.0], ab64[:-1]])
    sigma = np.sqrt(b64 * (1.0 - ab_prev) / (1.0 - ab64))
    coef = b64 / np.sqrt(1.0 - ab64)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    ts = jnp.arange(T - 1, -1, -1, dtype=jnp.int32)
    tab = (f32(coef)[ts], f32(1.0 / np.sqrt(1.0 - b64))[ts], f32(sigma)[ts])

    @jax.jit
    def run(params, key):
        key, k0 = jax.random.split(key)
        x = jax.random.normal(k0, (n, module.data_dim), jnp.float32)
        keys = jax.random.split(key, T)

        def step(x, inp):
            t, c, inv_sqrt_alpha, sig, k = inp
            eps = module.apply(params, x, t)
            mean = (x - c * eps) * inv_sqrt_alpha
            z = jax.random.normal(k, x.shape, jnp.float32)
            return mean + jnp.where(t > 0, sig, 0.0) * z, None

        x, _ = jax.lax.scan(step, x, (ts, *tab, keys))
        return x

    return np.asarray(run(params, jax.random.PRNGKey(seed)))
