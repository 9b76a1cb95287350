"""geomjobs.sampling against exact references.

The reference model: data x0 ~ N(mu, s^2 I). Its marginal at t is N(sqrt(a) mu, v I) with
a = abar_t and v = a s^2 + 1 - a, so the exact noise prediction is

    eps*(x, t) = E[eps | x_t = x] = sqrt(1 - a) (x - sqrt(a) mu) / v,
    x0*(x, t)  = E[x0 | x_t = x]  = mu + sqrt(a) s^2 (x - sqrt(a) mu) / v.

Write u = x - sqrt(a) mu. A DDIM step (eta = 0) from a to a' with these is linear in u:
u' = k u, k = (sqrt(a a') s^2 + sqrt((1 - a)(1 - a'))) / v (with eta > 0: u' = k u + sigma n,
k's second term using sqrt(1 - a' - sigma^2)), and the probability-flow ODE keeps u / sqrt(v)
constant, so its exact map from x_T at t_0 to the data (a = 1, v = s^2) is

    x0 = mu + s / sqrt(v_0) (x_T - sqrt(a_0) mu).

For s = 1, k = cos(theta - theta') with cos(theta) = sqrt(a): DDIM's result is
mu + prod_j cos(dtheta_j) u_T, off the exact map by exactly (1 - prod_j cos dtheta_j) |u_T| <=
sum_j dtheta_j^2 / 2 |u_T|.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs import diffusion, sampling
from geomjobs.generators.base import Denoiser
from geomjobs.sampling import Sampler

ABAR = diffusion.abar({})      # DDPM's linear schedule, T = 1000
MU = np.array([1.5, -2.0, 0.5])


def gaussian_denoiser(mu, s, abar=ABAR) -> Denoiser:
    ab = jnp.asarray(abar)

    def eps(params, x, t):
        a = ab[t]
        return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * mu) / (a * s * s + 1 - a)

    return Denoiser(eps, abar)


def exact_map(x_T, mu, s, a0):
    return mu + s / np.sqrt(a0 * s * s + 1 - a0) * (x_T - np.sqrt(a0) * mu)


def run(denoiser, x_T, sampler, noise=None, record=False):
    out = sampling.batch_sampler(denoiser, sampler, record=record)(None, jnp.asarray(x_T), noise)
    return tuple(np.asarray(o) for o in out) if record else np.asarray(out)


def ddim_reference(x_T, mu, s, steps, eta=0.0, noise=None):
    """DDIM on the Gaussian as the composition of its per-step maps u' = k u + sigma n (NumPy)."""
    _, a, an = sampling.schedule(ABAR, steps)
    u = x_T - np.sqrt(a[0]) * mu
    for j in range(steps):
        v = a[j] * s * s + 1 - a[j]
        sig = eta * np.sqrt((1 - an[j]) / (1 - a[j]) * (1 - a[j] / an[j]))
        k = (np.sqrt(a[j] * an[j]) * s * s + np.sqrt(max(1 - an[j] - sig ** 2, 0.0)) * np.sqrt(1 - a[j])) / v
        u = k * u + (sig * noise[:, j] if eta > 0 else 0.0)
    return np.sqrt(an[-1]) * mu + u


def dpmpp2m_reference(x_T, mu, s, steps):
    """DPM-Solver++(2M) written out as in diffusers (multistep_dpm_solver_{first,second}_order_update),
    with the exact data prediction x0* and NumPy only."""
    _, a, an = sampling.schedule(ABAR, steps)
    lam = lambda q: 0.5 * np.log(q / (1 - q))  # noqa: E731
    x, d_prev, h_prev = np.array(x_T, np.float64), None, None
    for j in range(steps):
        d = mu + np.sqrt(a[j]) * s * s * (x - np.sqrt(a[j]) * mu) / (a[j] * s * s + 1 - a[j])
        if an[j] == 1.0:             # sigma' = 0: the first-order update returns the data prediction
            return d
        h = lam(an[j]) - lam(a[j])
        first = np.sqrt(1 - an[j]) / np.sqrt(1 - a[j]) * x - np.sqrt(an[j]) * (np.exp(-h) - 1) * d
        if j == 0 or j >= steps - 2:
            x = first
        else:
            d1 = (d - d_prev) / (h_prev / h)
            x = first - 0.5 * np.sqrt(an[j]) * (np.exp(-h) - 1) * d1
        d_prev, h_prev = d, h
    return x


@pytest.fixture
def x_T():
    return np.stack([sampling.initial_noise(7, i, MU.shape) for i in range(32)])


# --------------------------------------------------------------------------------------------
# timesteps
# --------------------------------------------------------------------------------------------

def test_timesteps_are_diffusers_leading_spacing():
    np.testing.assert_array_equal(sampling.timesteps(1000, 50), np.arange(980, -1, -20))
    np.testing.assert_array_equal(sampling.timesteps(10, 3), [6, 3, 0])
    np.testing.assert_array_equal(sampling.timesteps(7, 1), [0])
    ts, a, an = sampling.schedule(ABAR, 4)
    np.testing.assert_array_equal(a, ABAR[[750, 500, 250, 0]])
    np.testing.assert_array_equal(an, np.append(ABAR[[500, 250, 0]], 1.0))
    with pytest.raises(ValueError, match="steps must be in 1..T"):
        sampling.timesteps(10, 11)


def test_timesteps_and_ddim_equal_diffusers_flax_ddim_scheduler():
    """FlaxDDIMScheduler (leading spacing, steps_offset 0, set_alpha_to_one) visits the same
    timesteps, and its eta = 0 step loop gives our DDIM sample (float64, same eps)."""
    import warnings

    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffusers.utils.logging.set_verbosity_error()
        sched = diffusers.FlaxDDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", set_alpha_to_one=True, clip_sample=False,
                                            steps_offset=0, dtype=jnp.float64)
        state = sched.set_timesteps(sched.create_state(), 20, (3,))
    np.testing.assert_array_equal(np.asarray(state.timesteps), sampling.timesteps(1000, 20))
    den = gaussian_denoiser(MU, 0.7)
    x = jnp.asarray(sampling.initial_noise(0, 0, (3,)))
    for t in np.asarray(state.timesteps):
        x = sched.step(state, den.eps(None, x, int(t)), int(t), x, eta=0.0).prev_sample
    ours = run(den, sampling.initial_noise(0, 0, (3,))[None], Sampler("ddim", 20))[0]
    # diffusers keeps its schedule in float32 (test_diffusion: abar within ~1e-6 relative)
    np.testing.assert_allclose(ours, np.asarray(x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# DDIM on the Gaussian
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("steps", [1, 3, 10, 50])
def test_ddim_equals_the_composition_of_its_affine_steps(x_T, s, steps):
    """float64 throughout: the scan and the NumPy composition agree to rounding (~1e-15 per step)."""
    np.testing.assert_allclose(run(gaussian_denoiser(MU, s), x_T, Sampler("ddim", steps)),
                               ddim_reference(x_T, MU, s, steps), rtol=0, atol=1e-10)


def test_ddim_approaches_the_exact_probability_flow_map_at_the_derived_rate(x_T):
    """s = 1: the error is exactly (1 - prod cos dtheta_j) |u_T| (module doc), within the bound
    sum dtheta^2 / 2 |u_T|, and it halves when the steps double (DDIM is first order)."""
    errs = {}
    for steps in (100, 200, 1000):
        _, a, an = sampling.schedule(ABAR, steps)
        theta, theta_n = np.arccos(np.sqrt(a)), np.arccos(np.sqrt(an))
        u_T = x_T - np.sqrt(a[0]) * MU
        got = run(gaussian_denoiser(MU, 1.0), x_T, Sampler("ddim", steps))
        exact = exact_map(x_T, MU, 1.0, a[0])
        gap = 1 - np.prod(np.cos(theta - theta_n))
        np.testing.assert_allclose(got - exact, -gap * u_T, rtol=0, atol=1e-10)
        assert gap <= np.sum((theta - theta_n) ** 2) / 2
        errs[steps] = np.abs(got - exact).max()
    assert 0.45 < errs[200] / errs[100] < 0.55
    assert errs[1000] < 5e-3 * np.abs(x_T).max() + 1e-2


@pytest.mark.parametrize("s", [0.5, 2.0])
def test_ddim_converges_to_the_exact_map_at_first_order(x_T, s):
    _, a, _ = sampling.schedule(ABAR, 100)
    e = {n: np.abs(run(gaussian_denoiser(MU, s), x_T, Sampler("ddim", n))
                   - exact_map(x_T, MU, s, sampling.schedule(ABAR, n)[1][0])).max() for n in (100, 200, 1000)}
    assert 0.45 < e[200] / e[100] < 0.55
    assert e[1000] < 1e-2


def ddim_output_law(s, steps, eta, add_noise=True):
    """The exact mean and variance of DDIM's output on N(mu, s^2 I) from x_T ~ N(0, I), through the
    per-step maps u' = k u + sigma n: (E[u_0] per unit of mu, Var[u_0]). ``add_noise=False``: the
    step shrinks eps by sigma but adds no noise (diffusers' FlaxDDIMScheduler with eta > 0)."""
    _, a, an = sampling.schedule(ABAR, steps)
    m, var = -np.sqrt(a[0]), 1.0
    for j in range(steps):
        v = a[j] * s * s + 1 - a[j]
        sig2 = eta ** 2 * (1 - an[j]) / (1 - a[j]) * (1 - a[j] / an[j])
        k = (np.sqrt(a[j] * an[j]) * s * s + np.sqrt(max(1 - an[j] - sig2, 0.0)) * np.sqrt(1 - a[j])) / v
        m, var = k * m, k * k * var + (sig2 if add_noise else 0.0)
    return m, var


def test_stochastic_ddim_output_law_approaches_the_data_distribution():
    """eta = 1 plugs the posterior mean E[x0 | x_t] into each step and so loses the posterior
    variance: the output variance falls short of s^2 by O(1/steps) (12% at 100 steps for s = 0.5,
    0.9% at 1000 steps for s = 1), the mean is off by < 3e-4 |mu|."""
    for s in (0.5, 1.0, 2.0):
        gaps = [1 - ddim_output_law(s, n, 1.0)[1] / s ** 2 for n in (100, 200, 500, 1000)]
        assert all(0 < g for g in gaps) and all(b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.02
        assert abs(ddim_output_law(s, 100, 1.0)[0]) < 3e-4


@pytest.mark.parametrize("s,steps", [(1.0, 1000), (0.5, 100)])
def test_stochastic_ddim_samples_its_exact_output_law(s, steps):
    """eta = 1, 4000 samples in 2-D (8000 coordinates; they are independent: the law is isotropic).
    The sample mean and variance lie within 5 standard errors of the sampler's exact law
    (:func:`ddim_output_law`: SE of the mean s / sqrt(8000), of the variance s^2 sqrt(2 / 7999));
    at 1000 steps with s = 1 that law is N(mu, s^2) to within 0.6 SE, so there the samples
    match the data distribution itself within 5 SE. diffusers' eta > 0 step adds no noise: its
    variance, prod k^2, is the eta = 0 law's, which we check is far outside."""
    mu, n = np.array([1.0, -1.0]), 4000
    noise = np.stack([sampling.step_noise(3, i, steps, (2,)) for i in range(n)])
    x_T = np.stack([sampling.initial_noise(3, i, (2,)) for i in range(n)])
    got = run(gaussian_denoiser(mu, s), x_T, Sampler("ddim", steps, eta=1.0), jnp.asarray(noise))
    np.testing.assert_allclose(got[:64], ddim_reference(x_T[:64], mu, s, steps, 1.0, noise[:64]), atol=1e-10)
    m, var = ddim_output_law(s, steps, 1.0)
    se_mean, se_var = s / np.sqrt(2 * n), s * s * np.sqrt(2 / (2 * n - 1))
    dev = got - mu
    assert np.abs(dev.mean() - m * mu.mean()) < 5 * se_mean and np.abs(dev.mean(0) - m * mu).max() < 5 * s / np.sqrt(n)
    assert abs(dev.var() - var) < 5 * se_var
    if steps == 1000:
        assert abs(var - s * s) < 0.6 * se_var
        assert abs(dev.var() - s * s) < 5 * se_var and np.abs(dev.mean(0)).max() < 5 * s / np.sqrt(n)
    assert abs(ddim_output_law(s, steps, 1.0, add_noise=False)[1] - var) > 20 * se_var


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
def test_dpmpp2m_equals_the_numpy_solver(x_T, s, steps):
    np.testing.assert_allclose(run(gaussian_denoiser(MU, s), x_T, Sampler("dpmpp2m", steps)),
                               dpmpp2m_reference(x_T, MU, s, steps), rtol=0, atol=1e-10)


@pytest.mark.parametrize("s", [1.0, 0.5, 2.0])
def test_dpmpp2m_beats_ddim_and_converges_at_second_order(x_T, s):
    """Max error to the exact map, measured here: at 10 steps DDIM is 0.3-0.7 and DPM-Solver++
    0.02-0.22; at 50 steps DDIM 0.07-0.14, DPM-Solver++ under 0.01. Doubling 100 -> 200 steps
    divides DPM-Solver++'s error by 3-4 (second order; DDIM's by 2)."""
    def err(kind, n):
        return np.abs(run(gaussian_denoiser(MU, s), x_T, Sampler(kind, n))
                      - exact_map(x_T, MU, s, sampling.schedule(ABAR, n)[1][0])).max()

    assert err("dpmpp2m", 10) < 0.8 * err("ddim", 10)
    assert err("dpmpp2m", 50) < 0.15 * err("ddim", 50) and err("dpmpp2m", 50) < 1e-2
    assert err("dpmpp2m", 200) / err("dpmpp2m", 100) < 0.35


# --------------------------------------------------------------------------------------------
# the loop's interface
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["ddim", "dpmpp2m"])
def test_recorded_states_are_the_inputs_of_each_step_and_the_result(x_T, kind):
    den, steps = gaussian_denoiser(MU, 0.5), 6
    x0, states = run(den, x_T, Sampler(kind, steps), record=True)
    assert states.shape == (len(x_T), steps + 1, 3)
    np.testing.assert_array_equal(states[:, 0], x_T)
    np.testing.assert_array_equal(states[:, -1], x0)
    np.testing.assert_array_equal(x0, run(den, x_T, Sampler(kind, steps)))
    if kind == "ddim":   # state j + 1 is one DDIM step from state j
        ts, a, an = sampling.schedule(ABAR, steps)
        for j in range(steps):
            eps = np.asarray(den.eps(None, jnp.asarray(states[:, j]), int(ts[j])))
            np.testing.assert_allclose(states[:, j + 1], diffusion.ddim_step(states[:, j], eps, a[j], an[j]), atol=1e-12)


def test_the_loop_runs_in_the_latents_dtype():
    den = gaussian_denoiser(MU, 0.5)
    x0 = sampling.batch_sampler(den, Sampler("dpmpp2m", 8))(None, jnp.asarray(np.zeros((2, 3)), jnp.float32))
    assert x0.dtype == jnp.float32


def test_guidance_hook_scale_zero_is_the_unguided_sample_and_it_moves_samples(x_T):
    den = gaussian_denoiser(MU, 0.5)
    target = jnp.asarray([3.0, 0.0, 0.0])
    grad_r = lambda x, t: target - x  # noqa: E731  (r = -|x - target|^2 / 2)
    plain = run(den, x_T, Sampler("ddim", 20))
    zero = np.asarray(sampling.batch_sampler(den, Sampler("ddim", 20), guidance=sampling.reward_guidance(grad_r, 0.0))(
        None, jnp.asarray(x_T)))
    np.testing.assert_array_equal(zero, plain)
    pushed = np.asarray(sampling.batch_sampler(den, Sampler("ddim", 20), guidance=sampling.reward_guidance(grad_r, 1.0))(
        None, jnp.asarray(x_T)))
    assert np.linalg.norm(pushed - target, axis=1).mean() < np.linalg.norm(plain - target, axis=1).mean()
    windowed = np.asarray(sampling.batch_sampler(den, Sampler("ddim", 20),
                                                 guidance=sampling.reward_guidance(grad_r, 1.0, window=(2000, 3000)))(
        None, jnp.asarray(x_T)))
    np.testing.assert_array_equal(windowed, plain)     # no timestep in the window: unguided


def test_sampler_config_refuses_bad_values():
    for bad, match in [(dict(kind="euler"), "unknown sampler"), (dict(steps=0), "steps"), (dict(steps=2.5), "steps"),
                       (dict(eta=1.5), "eta"), (dict(eta=-0.1), "eta"), (dict(kind="dpmpp2m", eta=0.5), "ddim sampler only")]:
        with pytest.raises(ValueError, match=match):
            Sampler(**bad)
    with pytest.raises(ValueError, match="needs the noise"):
        sampling.sample_loop(gaussian_denoiser(MU, 1.0), None, jnp.zeros(3), Sampler("ddim", 4, eta=0.5))


def test_noise_goes_to_stochastic_samplers_only_and_hooks_are_named_tuples(x_T):
    """The sampler's noise argument is never silently dropped; Guidance and BatchSampler are the
    hook's and the batch sampler's whole protocol (no function attributes)."""
    den = gaussian_denoiser(MU, 0.5)
    det, sto = sampling.batch_sampler(den, Sampler("ddim", 4)), sampling.batch_sampler(den, Sampler("ddim", 4, eta=0.5))
    assert isinstance(det, sampling.BatchSampler) and not det.stochastic and sto.stochastic
    noise = np.stack([sampling.step_noise(0, i, 4, (3,)) for i in range(len(x_T))])
    with pytest.raises(ValueError, match="deterministic"):
        det(None, jnp.asarray(x_T), jnp.asarray(noise))
    with pytest.raises(ValueError, match="deterministic"):
        sampling.sample_loop(den, None, jnp.zeros(3), Sampler("dpmpp2m", 4), noise=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="stochastic"):
        sto(None, jnp.asarray(x_T))
    assert det.jitted._cache_size() == 0
    det(None, jnp.asarray(x_T))
    assert det.jitted._cache_size() == 1
    grad_r = lambda p, x, t: -x  # noqa: E731
    hook = sampling.reward_guidance(grad_r, 1.0, with_params=True)
    assert isinstance(hook, sampling.Guidance) and hook.with_params
    params = jnp.zeros(())
    as_tuple = sampling.batch_sampler(den, Sampler("ddim", 4), guidance=hook)(params, jnp.asarray(x_T))
    plain_fn = sampling.batch_sampler(den, Sampler("ddim", 4), guidance=lambda e, x, t, ab: hook.fn(e, x, t, ab, params))(
        params, jnp.asarray(x_T))                     # a plain callable is Guidance(fn)
    np.testing.assert_array_equal(np.asarray(as_tuple), np.asarray(plain_fn))


def test_noise_streams_depend_on_seed_and_index_only():
    np.testing.assert_array_equal(sampling.initial_noise(5, 11, (2, 3)),
                                  np.random.default_rng([5, 11]).standard_normal((2, 3)))
    assert not np.array_equal(sampling.step_noise(5, 11, 4, (2,))[0], sampling.initial_noise(5, 11, (2,)))
    np.testing.assert_array_equal(sampling.step_noise(5, 11, 4, (2,)), np.random.default_rng([5, 11, 1]).standard_normal((4, 2)))
