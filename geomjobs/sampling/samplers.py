"""Samplers of a diffusion model's noise prediction (pure JAX: no Ray, no pyarrow).

A :class:`~geomjobs.generators.base.Denoiser` gives eps_theta(x_t, t) and the model's schedule
abar (alphas_cumprod, float64). :func:`sample_loop` runs ONE sample from its initial noise x_T to
the generated x_0 in one ``lax.scan`` (fixed shapes, jit-able; batch it with ``jax.vmap``, as
:func:`batch_sampler` does).

Timesteps (:func:`timesteps`): diffusers' "leading" spacing (the default of ``DDIMScheduler`` and
of Stable Diffusion's pipelines, with ``steps_offset = 0``): ratio r = T // steps and t_j =
(steps - 1 - j) r for j = 0..steps-1, descending, so t_0 = (steps - 1) r is the noisiest and the
last is t = 0. Step j goes from t_j to t_{j+1}, and the last step from t = 0 to the clean data
(abar = 1, diffusers' ``set_alpha_to_one``), so its result is the model's x0 prediction at t = 0.
x_T ~ N(0, I) is taken as the state at t_0 (as diffusers does).

Kinds (:class:`Sampler`):

- ``ddim`` (Song et al. 2021): :func:`geomjobs.diffusion.ddim_step` with eta in [0, 1]; eta > 0
  adds sigma_j * noise_j with the noise passed in, shape (steps, *latent_shape) per sample.
- ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2; diffusers'
  ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
  solver_type="midpoint")``), deterministic. With alpha = sqrt(abar), sigma = sqrt(1 - abar),
  lambda = log(alpha / sigma), h_j = lambda_{j+1} - lambda_j and the data prediction D_j =
  x0_hat(x_j, t_j)::

      x_{j+1} = (sigma_{j+1} / sigma_j) x_j + alpha_{j+1} (1 - e^{-h_j}) [D_j + (D_j - D_{j-1}) / (2 r_j)],
      r_j = h_{j-1} / h_j,

  first order (no bracketed difference, = DDIM with eta = 0) on the first step and on the last
  two: the last one's target sigma = 0 makes h infinite (diffusers' ``final_sigmas_type="zero"``),
  and the one into t = 0 is, with the leading spacing, much longer in lambda than the step
  before it (r_j << 1), where the 2M extrapolation overshoots. diffusers does the same below 15
  steps (``lower_order_final``); we do it at every step count, because on the exact Gaussian
  reference (tests/test_sampling.py) a second-order step there made 20 steps 50x less accurate
  (max error 0.25 against 0.005) while costing nothing asymptotically (error still ~ steps^-2).

Sample i's randomness (:func:`initial_noise`, :func:`step_noise`): x_T = numpy
``default_rng([seed, i]).standard_normal(shape)`` (the latent ``{kind: gaussian, seed}`` gives
sample i) and the eta > 0 noise ``default_rng([seed, i, 1]).standard_normal((steps, *shape))``, so
sample i's path depends only on (seed, i), never on batching or sharding.

Guidance hook (:class:`Guidance`): ``fn(eps, x_t, t, abar_t) -> eps'`` replaces the model's eps
at every step before the update; :func:`geomjobs.sampling.guidance.reward_guidance` builds docs/reward.md
's classifier guidance from the gradient of a reward r(x_t, t). None (the default) leaves
eps as it is; a plain callable is taken as ``Guidance(fn)``. With ``with_params=True`` the hook is
called as ``fn(eps, x_t, t, abar_t, params)`` with the sampler's ``params``, so that a reward's
weights are arguments of the jitted sampler (one compile serves any weights) rather than constants
baked into it (:mod:`geomjobs.sampling.guidance` passes ``{"model": ..., "reward": ...}``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion

SAMPLER_KINDS = ("ddim", "dpmpp2m")


class Guidance(NamedTuple):
    """A sampler's guidance hook (module doc): ``fn(eps, x_t, t, abar_t) -> eps'``, called with the
    sampler's params as a fifth argument when ``with_params``."""
    fn: Callable[..., jax.Array]
    with_params: bool = False


class BatchSampler(NamedTuple):
    """What :func:`batch_sampler` returns: call it as ``(params, x_T, noise=None)``; ``jitted`` is
    the underlying ``jax.jit`` object (its ``_cache_size()`` counts compiles)."""
    jitted: Any
    stochastic: bool

    def __call__(self, params, x_T, noise=None):
        if self.stochastic and noise is None:
            raise ValueError("this sampler is stochastic (ddim with eta > 0): pass the step noise, shape (B, steps, *shape)")
        if not self.stochastic and noise is not None:
            raise ValueError("this sampler is deterministic: it takes no noise (pass None)")
        return self.jitted(params, x_T, noise) if self.stochastic else self.jitted(params, x_T)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """How to sample: ``kind`` in :data:`SAMPLER_KINDS`, ``steps`` >= 1 model evaluations, and
    ``eta`` in [0, 1] (ddim only; 0 is deterministic). Raises ValueError otherwise."""
    kind: str = "ddim"
    steps: int = 50
    eta: float = 0.0

    def __post_init__(self):
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"unknown sampler kind {self.kind!r}; expected one of {list(SAMPLER_KINDS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta!r}")
        if self.kind != "ddim" and self.eta != 0:
            raise ValueError(f"eta applies to the ddim sampler only; {self.kind} is deterministic")

    @property
    def stochastic(self) -> bool:
        return self.kind == "ddim" and self.eta > 0


def timesteps(T: int, steps: int) -> np.ndarray:
    """The ``steps`` timesteps a sampler visits, descending (first = noisiest), int64: diffusers'
    "leading" spacing (module doc), t_j = (steps - 1 - j) * (T // steps). Needs 1 <= steps <= T."""
    T, steps = int(T), int(steps)
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in 1..T = {T} (the model has {T} timesteps), got {steps}")
    return (np.arange(steps, dtype=np.int64) * (T // steps))[::-1].copy()


def schedule(abar: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t_j, abar at t_j, abar at the step's target) for j = 0..steps-1, the abar's in float64;
    the last target is abar = 1 (clean data)."""
    ab = np.asarray(abar, np.float64)
    ts = timesteps(len(ab), steps)
    a = ab[ts]
    return ts, a, np.append(a[1:], 1.0)


def dpmpp2m_coefficients(a: np.ndarray, a_next: np.ndarray) -> np.ndarray:
    """(steps, 3) float64: per step j, (c_x, c_d, c_2) with x_{j+1} = c_x x_j + c_d D_j + c_2 (D_j -
    D_{j-1}) (DPM-Solver++(2M), module doc); c_2 = 0 on the first step and on the last two."""
    a, a_next = np.asarray(a, np.float64), np.asarray(a_next, np.float64)
    n = len(a)
    alpha, sigma = np.sqrt(a), np.sqrt(1.0 - a)
    alpha_n, sigma_n = np.sqrt(a_next), np.sqrt(1.0 - a_next)
    lam = np.log(alpha) - np.log(sigma)
    with np.errstate(divide="ignore"):
        lam_n = np.log(alpha_n) - np.log(sigma_n)          # +inf where the target is clean data
    h = lam_n - lam
    c_x = sigma_n / sigma
    c_d = alpha_n * -np.expm1(-h)                         # alpha' (1 - e^{-h}); = alpha' = 1 where h = inf
    c_2 = np.zeros(n)
    for j in range(1, n):
        if j < n - 2:
            r = h[j - 1] / h[j]
            c_2[j] = c_d[j] / (2.0 * r)
    return np.stack([c_x, c_d, c_2], axis=1)


def initial_noise(seed: int, i: int, shape) -> np.ndarray:
    """Sample i's x_T (float64): ``default_rng([seed, i]).standard_normal(shape)``."""
    return np.random.default_rng([int(seed), int(i)]).standard_normal(tuple(shape))


def step_noise(seed: int, i: int, steps: int, shape) -> np.ndarray:
    """Sample i's eta > 0 noise (float64, (steps, *shape)): ``default_rng([seed, i, 1])``."""
    return np.random.default_rng([int(seed), int(i), 1]).standard_normal((int(steps), *tuple(shape)))


def sample_loop(denoiser, params: Any, x_T, sampler: Sampler, noise=None, record: bool = False,
                guidance: Guidance | Callable | None = None):
    """Sample ONE latent: x_T (latent shape, the state at timesteps[0]) -> x_0.

    ``denoiser`` is a :class:`~geomjobs.generators.base.Denoiser` (``eps(params, x_t, t)``,
    ``abar``). ``noise`` (steps, *x_T.shape) is needed by ddim with eta > 0 (:func:`step_noise`)
    and refused (ValueError) by a deterministic sampler. The computation runs in x_T's dtype (the schedule is rounded to it).
    Returns x_0, or with ``record=True`` (x_0, states), states (steps + 1, *x_T.shape): states[j]
    is the input of step j (at ``timesteps[j]``) and states[steps] = x_0."""
    x_T = jnp.asarray(x_T)
    dt = x_T.dtype
    if guidance is not None and not isinstance(guidance, Guidance):
        guidance = Guidance(guidance)
    ts, a, a_next = schedule(denoiser.abar, sampler.steps)
    if sampler.stochastic:
        if noise is None:
            raise ValueError(f"ddim with eta = {sampler.eta} needs the noise, shape {(sampler.steps, *x_T.shape)}")
        noise = jnp.asarray(noise, dt)
        if noise.shape != (sampler.steps, *x_T.shape):
            raise ValueError(f"noise must have shape {(sampler.steps, *x_T.shape)}, got {noise.shape}")
    elif noise is not None:
        raise ValueError(f"the {sampler.kind} sampler (eta = {sampler.eta}) is deterministic: it takes no noise")
    else:
        noise = jnp.zeros((sampler.steps, *([1] * x_T.ndim)), dt)   # a placeholder scanned over, never used
    tab = lambda v: jnp.asarray(np.asarray(v), dt)  # noqa: E731
    xs = {"t": jnp.asarray(ts, jnp.int32), "a": tab(a), "a_next": tab(a_next), "noise": noise}

    def eps_at(x, t, ab):
        eps = denoiser.eps(params, x, t).astype(dt)
        if guidance is None:
            return eps
        extra = (params,) if guidance.with_params else ()
        return guidance.fn(eps, x, t, ab, *extra).astype(dt)

    if sampler.kind == "ddim":
        eta = float(sampler.eta)

        def step(carry, s):
            x = carry
            eps = eps_at(x, s["t"], s["a"])
            nxt = diffusion.ddim_step(x, eps, s["a"], s["a_next"], eta, s["noise"] if eta > 0 else None)
            return nxt.astype(dt), (x if record else None)

        init = x_T
    else:
        xs["c"] = tab(dpmpp2m_coefficients(a, a_next))

        def step(carry, s):
            x, d_prev = carry
            d = diffusion.x0_from_eps(x, eps_at(x, s["t"], s["a"]), s["a"]).astype(dt)
            c_x, c_d, c_2 = s["c"][0], s["c"][1], s["c"][2]
            nxt = c_x * x + c_d * d + c_2 * (d - d_prev)
            return (nxt.astype(dt), d), (x if record else None)

        init = (x_T, jnp.zeros_like(x_T))
    final, states = jax.lax.scan(step, init, xs)
    x0 = final if sampler.kind == "ddim" else final[0]
    if not record:
        return x0
    return x0, jnp.concatenate([states, x0[None]], axis=0)


def batch_sampler(denoiser, sampler: Sampler, record: bool = False, guidance: Guidance | Callable | None = None,
                  param_axes: Any = None) -> BatchSampler:
    """A jitted ``fn(params, x_T, noise=None) -> x_0`` (or ``(x_0, states)``) over a batch: x_T (B,
    *shape), noise (B, steps, *shape) for a stochastic sampler and None (omitted) for a
    deterministic one (ValueError otherwise), :func:`sample_loop` vmapped (:class:`BatchSampler`).

    ``param_axes``: the ``jax.vmap`` in_axes of ``params`` (None: shared by the whole batch). A
    pytree prefix such as ``{"unet": None, "context": 0}`` gives each sample its own leaf (here a
    per-sample prompt context with a leading batch axis) as an argument of the one program."""
    if sampler.stochastic:
        def one(params, x, n):
            return sample_loop(denoiser, params, x, sampler, n, record, guidance)

        return BatchSampler(jax.jit(jax.vmap(one, in_axes=(param_axes, 0, 0))), True)

    def one_det(params, x):
        return sample_loop(denoiser, params, x, sampler, None, record, guidance)

    return BatchSampler(jax.jit(jax.vmap(one_det, in_axes=(param_axes, 0))), False)


__all__ = ["SAMPLER_KINDS", "BatchSampler", "Guidance", "Sampler", "batch_sampler", "dpmpp2m_coefficients", "initial_noise", "sample_loop",
           "schedule", "step_noise", "timesteps"]
