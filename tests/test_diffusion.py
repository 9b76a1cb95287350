"""geomjobs.diffusion: schedules against diffusers' Flax schedulers, the conversions between
predictions, forward diffusion and the DDIM update against closed forms derived by hand."""
from __future__ import annotations

import math
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs import diffusion

SCHEDULERS = [
    {"beta_schedule": "linear", "num_train_timesteps": 1000},
    {"beta_schedule": "linear", "num_train_timesteps": 100, "beta_start": 1e-4, "beta_end": 0.02},
    {"beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000},
    {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 50},
]


def flax_scheduler(cls_name: str, config: dict):
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.utils.logging.set_verbosity_error()
        sched = getattr(diffusers, cls_name).from_config(config)
        return sched, sched.create_state()


@pytest.mark.parametrize("config", SCHEDULERS)
@pytest.mark.parametrize("cls_name", ["FlaxDDPMScheduler", "FlaxDDIMScheduler"])
def test_abar_equals_diffusers_flax_schedulers_alphas_cumprod(cls_name, config):
    """diffusers builds the betas in float32 (cosine: in float64, then rounded) and multiplies T
    float32 factors. Relative error of factor s, 1 - beta_s in float32: half an ulp (2^-24) for
    its own rounding plus beta_s's rounding amplified by beta_s / (1 - beta_s) (large where the
    cosine schedule's cap 0.999 binds); the running product adds 2^-24 per step. So abar_t may be
    off by 2^-24 sum_{s<=t} (2 + beta_s / (1 - beta_s)); we allow twice that. The betas
    themselves come from float32 linspace: a few ulps of the largest entry (doubled by the square
    of scaled_linear), so 8 ulps of max(beta) absolute."""
    _, state = flax_scheduler(cls_name, config)
    T = config["num_train_timesteps"]
    b = diffusion.diffusers_betas(config)
    ours = diffusion.abar(betas=b)
    ref = np.asarray(state.common.alphas_cumprod, np.float64)
    assert ours.dtype == np.float64 and ours.shape == (T,)
    bound = 2 * 2.0 ** -24 * np.cumsum(2 + b / (1 - b))
    assert np.all(np.abs(ours - ref) <= bound * ours), np.max(np.abs(ours - ref) / ours / bound)
    np.testing.assert_allclose(b, np.asarray(state.common.betas, np.float64), rtol=0, atol=8 * 2.0 ** -24 * b.max())


def test_schedule_kinds_are_the_diffusers_formulas():
    """Our schedule names and diffusers' give the same float64 arrays (cosine = squaredcos_cap_v2,
    whose beta_start / beta_end do not enter), and the formulas by hand."""
    T = 50
    np.testing.assert_array_equal(diffusion.schedule_betas({"kind": "cosine", "T": T}),
                                  diffusion.diffusers_betas({"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": T}))
    f = [math.cos((i / T + 0.008) / 1.008 * math.pi / 2) ** 2 for i in range(T + 1)]
    np.testing.assert_allclose(diffusion.betas("cosine", T), [min(1 - f[i + 1] / f[i], 0.999) for i in range(T)], rtol=1e-15)
    assert diffusion.betas("cosine", T)[-1] == 0.999                   # the cap binds at the last step
    np.testing.assert_allclose(diffusion.betas("scaled_linear", 3, 0.0001, 0.0009), [1e-4, 4e-4, 9e-4], rtol=1e-14)
    np.testing.assert_array_equal(diffusion.betas("linear", 3, 0.1, 0.3), np.linspace(0.1, 0.3, 3))
    np.testing.assert_allclose(diffusion.abar(betas=[0.1, 0.2, 0.5]), [0.9, 0.72, 0.36], rtol=1e-15)
    np.testing.assert_array_equal(diffusion.abar({"kind": "cosine", "T": T}), np.cumprod(1 - diffusion.betas("cosine", T)))
    np.testing.assert_array_equal(diffusion.alphas_cumprod([0.1, 0.2]), diffusion.abar(betas=[0.1, 0.2]))   # the alias
    with pytest.raises(TypeError, match="exactly one"):
        diffusion.abar({}, betas=[0.1])
    # the default schedule is DDPM's
    np.testing.assert_array_equal(diffusion.schedule_betas({}), np.linspace(1e-4, 0.02, 1000))
    trained = [0.1, 0.2]
    np.testing.assert_array_equal(diffusion.diffusers_betas({"trained_betas": trained, "beta_schedule": "cubic"}), trained)
    with pytest.raises(ValueError, match="cubic"):
        diffusion.diffusers_betas({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        diffusion.diffusers_betas({"rescale_betas_zero_snr": True})
    with pytest.raises(ValueError, match="unknown schedule kind"):
        diffusion.betas("sigmoid", 10)


@pytest.fixture
def draws():
    rng = np.random.default_rng(0)
    abar = np.array([1e-3, 0.05, 0.5, 0.9, 0.999])[:, None]            # one per row, broadcast over 6 dims
    return rng.standard_normal((5, 6)), rng.standard_normal((5, 6)), abar


def test_forward_diffusion_is_its_formula_and_diffusers_add_noise(draws):
    z0, eps, abar = draws
    np.testing.assert_array_equal(diffusion.forward_diffuse(z0, abar, eps), np.sqrt(abar) * z0 + np.sqrt(1 - abar) * eps)
    zt = diffusion.forward_diffuse(z0[0], 0.3, eps[0])             # a Python float abar
    np.testing.assert_allclose(zt, math.sqrt(0.3) * z0[0] + math.sqrt(0.7) * eps[0], rtol=1e-15)
    # diffusers' add_noise with its own (float32) abar_t at timesteps t
    sched, state = flax_scheduler("FlaxDDPMScheduler", SCHEDULERS[2])
    t = np.array([0, 10, 400, 900, 999])
    got = sched.add_noise(state, jnp.asarray(z0, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(t))
    ab = np.asarray(state.common.alphas_cumprod, np.float64)[t][:, None]
    np.testing.assert_allclose(np.asarray(got, np.float64), diffusion.forward_diffuse(z0, ab, eps), rtol=1e-5, atol=1e-6)


def test_conversions_invert_each_other(draws):
    """z_t, eps, x0 and v = sqrt(abar) eps - sqrt(1 - abar) x0 determine each other; in float64 the
    round trips are exact up to rounding, amplified by 1/sqrt(abar) or 1/sqrt(1 - abar) where the
    conversion divides by it."""
    z0, eps, abar = draws
    zt = diffusion.forward_diffuse(z0, abar, eps)
    v = np.sqrt(abar) * eps - np.sqrt(1 - abar) * z0
    tol = 1e-14 / np.sqrt(abar * (1 - abar))
    np.testing.assert_allclose(diffusion.x0_from_eps(zt, eps, abar), z0, rtol=0, atol=tol.max())
    np.testing.assert_allclose(diffusion.eps_from_x0(zt, z0, abar), eps, rtol=0, atol=tol.max())
    np.testing.assert_allclose(diffusion.eps_from_v(zt, v, abar), eps, rtol=0, atol=1e-14)
    np.testing.assert_allclose(diffusion.x0_from_v(zt, v, abar), z0, rtol=0, atol=1e-14)
    # JAX arrays, and a float32 computation with a Python-float abar stays float32
    z32, e32 = jnp.asarray(z0[2], jnp.float32), jnp.asarray(eps[2], jnp.float32)
    out = diffusion.x0_from_eps(diffusion.forward_diffuse(z32, 0.5, e32), e32, 0.5)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), z0[2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(diffusion.eps_from_v(jnp.asarray(zt), jnp.asarray(v), jnp.asarray(abar))), eps,
                               rtol=0, atol=1e-14)


@pytest.mark.parametrize("s", [1.0, 0.3, 2.5])
def test_ddim_step_with_the_exact_eps_of_gaussian_data(s):
    """Data x0 ~ N(mu, s^2 I). Then z_t ~ N(sqrt(a) mu, v I) with v = a s^2 + 1 - a, and the exact
    eps prediction is E[eps | z_t] = sqrt(1 - a) u / v, u = z_t - sqrt(a) mu. By hand:
    x0_hat = mu + sqrt(a) s^2 u / v, so the deterministic DDIM step from abar a to a' is
        z_prev = sqrt(a') mu + u (sqrt(a a') s^2 + sqrt((1 - a)(1 - a'))) / v
    (for s = 1, v = 1 and the factor is cos(theta - theta'), a = cos^2 theta)."""
    rng = np.random.default_rng(1)
    mu, zt = rng.standard_normal(7), rng.standard_normal(7) * 2
    a, a_prev = 0.3, 0.6
    v = a * s ** 2 + 1 - a
    u = zt - math.sqrt(a) * mu
    eps = math.sqrt(1 - a) * u / v
    want = math.sqrt(a_prev) * mu + u * (math.sqrt(a * a_prev) * s ** 2 + math.sqrt((1 - a) * (1 - a_prev))) / v
    np.testing.assert_allclose(diffusion.ddim_step(zt, eps, a, a_prev), want, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(diffusion.x0_from_eps(zt, eps, a), mu + math.sqrt(a) * s ** 2 * u / v, rtol=1e-13, atol=1e-13)
    if s == 1.0:
        th, th_prev = math.acos(math.sqrt(a)), math.acos(math.sqrt(a_prev))
        np.testing.assert_allclose(want - math.sqrt(a_prev) * mu, u * math.cos(th - th_prev), rtol=1e-13)
    # eta > 0 with the noise given: the same mean direction shrunk, plus sigma_t * noise
    noise = rng.standard_normal(7)
    sig = diffusion.ddim_sigma(a, a_prev, 0.5)
    np.testing.assert_allclose(sig, 0.5 * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)), rtol=1e-15)
    x0 = mu + math.sqrt(a) * s ** 2 * u / v
    np.testing.assert_allclose(diffusion.ddim_step(zt, eps, a, a_prev, 0.5, noise),
                               math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sig ** 2) * eps + sig * noise, rtol=1e-13)


def test_ddim_with_eta_1_between_consecutive_steps_is_the_ddpm_posterior():
    """Song et al.: eta = 1 gives DDPM's ancestral step. With eps = eps_from_x0(z_t, x0) the step
    is the posterior q(z_{t-1} | z_t, x0) = N(mu_tilde, beta_tilde I) of Ho et al. (eq. 7):
    mu_tilde = sqrt(a') beta / (1 - a) x0 + sqrt(alpha) (1 - a') / (1 - a) z_t, beta_tilde =
    (1 - a') / (1 - a) beta, with alpha = a / a', beta = 1 - alpha."""
    ab = diffusion.abar(betas=diffusion.betas("linear", 100))
    rng = np.random.default_rng(2)
    x0, zt, noise = rng.standard_normal((3, 5))
    for t in (1, 40, 99):
        a, a_prev = ab[t], ab[t - 1]
        alpha = a / a_prev
        beta = 1 - alpha
        mean = math.sqrt(a_prev) * beta / (1 - a) * x0 + math.sqrt(alpha) * (1 - a_prev) / (1 - a) * zt
        var = (1 - a_prev) / (1 - a) * beta
        got = diffusion.ddim_step(zt, diffusion.eps_from_x0(zt, x0, a), a, a_prev, 1.0, noise)
        np.testing.assert_allclose(got, mean + math.sqrt(var) * noise, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers_flax_ddim_with_zero_noise(eta):
    """diffusers' FlaxDDIMScheduler.step (10 of 1000 steps, SD's schedule) on the same inputs and
    its own float32 abar (no clipping of x0_hat): with eta > 0 it shrinks the eps term but adds
    no noise, which is our step with noise = 0 (float32 arithmetic there: rtol 1e-5)."""
    sched, state = flax_scheduler("FlaxDDIMScheduler", {**SCHEDULERS[2], "set_alpha_to_one": True, "clip_sample": False})
    state = sched.set_timesteps(state, 10, (6,))
    rng = np.random.default_rng(3)
    ab = np.asarray(state.common.alphas_cumprod, np.float64)
    for t in (900, 500, 0):
        zt, eps = rng.standard_normal((2, 6))
        ref = sched.step(state, jnp.asarray(eps, jnp.float32), t, jnp.asarray(zt, jnp.float32), eta=eta).prev_sample
        a_prev = ab[t - 100] if t >= 100 else 1.0                   # set_alpha_to_one: abar before step 0 is 1
        got = diffusion.ddim_step(zt, eps, ab[t], a_prev, eta, np.zeros(6))
        np.testing.assert_allclose(np.asarray(ref, np.float64), got, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        diffusion.ddim_step(zt, eps, 0.5, 0.6, 0.5)
