"""The diffusion mathematics every part of geomjobs shares (pure NumPy / JAX; no Ray, no pyarrow).

Conventions (Ho et al. 2020, timesteps numbered 0..T-1, as diffusers numbers them)::

    beta_t   the noise schedule, t = 0..T-1                      (:func:`betas`)
    abar_t   = prod_{s <= t} (1 - beta_s)                        (:func:`abar`: its one home)
    z_t      = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps           (:func:`forward_diffuse`)
    x0_hat   = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)       (:func:`x0_from_eps`)
    eps      = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)        (:func:`eps_from_x0`)
    v        = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0           (v-prediction, Salimans & Ho 2022):
    eps      = sqrt(abar_t) v + sqrt(1 - abar_t) z_t             (:func:`eps_from_v`)
    x0       = sqrt(abar_t) z_t - sqrt(1 - abar_t) v             (:func:`x0_from_v`)

Schedules (:data:`SCHEDULE_KINDS`), with diffusers' formulas (``CommonSchedulerState.create``):

    linear         beta = linspace(beta_start, beta_end, T)
    scaled_linear  beta = linspace(sqrt(beta_start), sqrt(beta_end), T)^2       (Stable Diffusion)
    cosine         beta_i = min(1 - f((i + 1) / T) / f(i / T), 0.999),
                   f(u) = cos((u + 0.008) / 1.008 * pi / 2)^2   (Nichol & Dhariwal 2021; diffusers'
                   ``squaredcos_cap_v2``; beta_start / beta_end do not enter)

Schedules are computed in float64 NumPy; callers round to their dtype (the zoo DDPM's fixed-timestep
generator rounds abar_t to float32, its Denoiser keeps the float64 schedule).

DDIM (Song et al. 2021, eq. 12 and 16), from timestep t to an earlier one with abar_prev::

    sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
    z_prev  = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t * noise

eta = 0 is the deterministic sampler; eta = 1 between consecutive timesteps is DDPM's ancestral
step. The noise is an argument: diffusers' ``FlaxDDIMScheduler.step`` with eta > 0 shrinks the
eps direction but adds no noise (its result is this step with noise = 0).

The conversions take ``abar`` as a Python float (its roots are then taken in float64 and enter
JAX as weakly typed scalars, so a float32 computation stays float32) or as an array broadcastable
against the latents (NumPy or JAX).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")
DEFAULT_SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
COSINE_MAX_BETA = 0.999
# diffusers' beta_schedule names -> ours
DIFFUSERS_KINDS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


# --------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------

def betas(kind: str, T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_0..beta_{T-1} (float64) of a schedule kind in :data:`SCHEDULE_KINDS` (formulas: module doc)."""
    T = int(T)
    if kind == "linear":
        return np.linspace(float(beta_start), float(beta_end), T, dtype=np.float64)
    if kind == "scaled_linear":
        return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2
    if kind == "cosine":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f((i + 1) / T) / f(i / T), COSINE_MAX_BETA) for i in range(T)], np.float64)
    raise ValueError(f"unknown schedule kind {kind!r}; expected one of {list(SCHEDULE_KINDS)}")


def abar(schedule: Mapping | None = None, *, betas=None) -> np.ndarray:
    """abar_t = prod_{s <= t} (1 - beta_s), t = 0..T-1, float64: of a schedule mapping ``{kind, T,
    beta_start, beta_end}`` (missing keys: :data:`DEFAULT_SCHEDULE`), or of the given ``betas``
    (e.g. :func:`diffusers_betas`). Exactly one of the two."""
    if (schedule is None) == (betas is None):
        raise TypeError("abar() takes a schedule mapping or betas=, exactly one")
    b = schedule_betas(schedule) if betas is None else betas
    return np.cumprod(1.0 - np.asarray(b, np.float64))


def alphas_cumprod(b: np.ndarray) -> np.ndarray:
    """diffusers' name for ``abar(betas=b)``; kept for callers outside the package."""
    return abar(betas=b)


def schedule_betas(schedule: Mapping) -> np.ndarray:
    """betas of a schedule mapping ``{kind, T, beta_start, beta_end}`` (missing keys: :data:`DEFAULT_SCHEDULE`)."""
    s = {**DEFAULT_SCHEDULE, **schedule}
    return betas(s["kind"], s["T"], s["beta_start"], s["beta_end"])


def diffusers_betas(config: Mapping) -> np.ndarray:
    """betas of a diffusers scheduler config (``scheduler_config.json``): ``trained_betas``, or
    ``beta_schedule`` linear / scaled_linear / squaredcos_cap_v2 with ``num_train_timesteps``,
    ``beta_start``, ``beta_end`` (diffusers' defaults 1000, 0.0001, 0.02). Raises ValueError for
    anything else, and for ``rescale_betas_zero_snr`` (abar_{T-1} = 0)."""
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr schedules (abar_{T-1} = 0) are not supported")
    if config.get("trained_betas") is not None:
        return np.asarray(config["trained_betas"], np.float64)
    name = config.get("beta_schedule", "linear")
    if name not in DIFFUSERS_KINDS:
        raise ValueError(f"beta_schedule {name!r} is not supported; expected linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas")
    return betas(DIFFUSERS_KINDS[name], int(config.get("num_train_timesteps", 1000)),
                 float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02)))


# --------------------------------------------------------------------------------------------
# forward diffusion and the conversions between predictions
# --------------------------------------------------------------------------------------------

def _sqrt(x):
    """sqrt of a host scalar as a Python float (weakly typed in JAX), else of an array of its kind."""
    if isinstance(x, (int, float, np.floating)):
        return math.sqrt(x)
    return jnp.sqrt(x) if isinstance(x, jax.Array) else np.sqrt(x)


def _roots(abar):
    """(sqrt(abar), sqrt(1 - abar))."""
    return _sqrt(abar), _sqrt(1.0 - abar)


def forward_diffuse(z0, abar, eps):
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps."""
    a, s = _roots(abar)
    return a * z0 + s * eps


def x0_from_eps(z_t, eps, abar):
    """x0_hat = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
    a, s = _roots(abar)
    return (z_t - s * eps) / a


def eps_from_x0(z_t, x0, abar):
    """eps = (z_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
    a, s = _roots(abar)
    return (z_t - a * x0) / s


def eps_from_v(z_t, v, abar):
    """eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t (v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0)."""
    a, s = _roots(abar)
    return a * v + s * z_t


def x0_from_v(z_t, v, abar):
    """x0 = sqrt(abar_t) z_t - sqrt(1 - abar_t) v."""
    a, s = _roots(abar)
    return a * z_t - s * v


# --------------------------------------------------------------------------------------------
# DDIM
# --------------------------------------------------------------------------------------------

def ddim_sigma(abar, abar_prev, eta: float):
    """sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) (Song et al. eq. 16)."""
    return eta * _sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))


def ddim_step(z_t, eps, abar, abar_prev, eta: float = 0.0, noise=None):
    """One DDIM update z_t -> z_prev given the predicted eps (formula: module doc).

    ``noise`` (shape of z_t, N(0, I)) is needed when eta > 0 and ignored when eta == 0; with
    noise = 0 this is exactly what diffusers' ``FlaxDDIMScheduler.step(..., eta=eta)`` returns."""
    x0 = x0_from_eps(z_t, eps, abar)
    if eta == 0:
        return _sqrt(abar_prev) * x0 + _sqrt(1.0 - abar_prev) * eps
    if noise is None:
        raise ValueError("ddim_step with eta > 0 needs the noise term (an array shaped like z_t)")
    sigma = ddim_sigma(abar, abar_prev, eta)
    return _sqrt(abar_prev) * x0 + _sqrt(1.0 - abar_prev - sigma ** 2) * eps + sigma * noise
