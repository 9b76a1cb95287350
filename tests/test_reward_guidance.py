"""Reward guidance (SPEC section 3): eps' = eps - sqrt(1 - abar_t) * scale * grad r(z_t, t).

On the shipped ddpm-gmm2d (T = 100, 2-D latents): one DDIM step with an analytic reward moves the
sample by exactly the hand-computed classifier-guidance update (sign and magnitude), through the
sampler hook and through a reward folder in a job's latent source; scale 0 is bitwise the unguided
sampler; the guided sampler compiles once; the reward travels with a pickled source (the folder
deleted); bad guidance sections exit 2 naming their key before any work."""
from __future__ import annotations

import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from geomjobs import sampling
from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.latents import build_latents
from geomjobs.runner.plan import plan_job
from geomjobs.sampling import Sampler
from geomjobs.sampling.reward_net import build_network, init_params, network_config, reward_meta, save_reward
from geomjobs.spec import validate_spec

DDPM = {"kind": "zoo", "name": "ddpm-gmm2d"}
T = 100


@pytest.fixture(scope="module")
def gen():
    g = build_generator(DDPM)
    assert g.denoiser.num_timesteps == T
    return g


def step_gain(abar, steps):
    """Per-step c_j = sqrt(1 - a) (sqrt(a') sqrt(1 - a) / sqrt(a) - sqrt(1 - a')) (guidance module doc):
    the DDIM (eta = 0) step from the same z_t moves by scale * c_j * grad r(z_t, t_j)."""
    ts, a, an = sampling.schedule(abar, steps)
    return ts, np.sqrt(1 - a) * (np.sqrt(an) * np.sqrt(1 - a) / np.sqrt(a) - np.sqrt(1 - an))


def r_analytic(z, t):
    """r(z, t) = -(1 + t / T) |z - m|^2 / 2: grad = -(1 + t / T) (z - m), depends on both z and t."""
    m = jnp.asarray([1.5, -2.0], z.dtype)
    return -0.5 * (1.0 + jnp.asarray(t, z.dtype) / T) * jnp.sum((z - m) ** 2)   # t: the sampler's int32


@pytest.mark.parametrize("scale", [1.5, -0.7])
def test_one_step_moves_along_the_gradient_by_the_hand_computed_update(gen, scale):
    steps = 5
    x_T = np.random.default_rng(0).standard_normal((4, 2))      # float64 (tests enable x64)
    plain = sampling.batch_sampler(gen.denoiser, Sampler("ddim", steps), record=True)(gen.params, jnp.asarray(x_T))[1]
    hook = sampling.reward_guidance(jax.grad(r_analytic), scale)
    guided = sampling.batch_sampler(gen.denoiser, Sampler("ddim", steps), record=True, guidance=hook)(
        gen.params, jnp.asarray(x_T))[1]
    plain, guided = np.asarray(plain), np.asarray(guided)
    ts, c = step_gain(gen.denoiser.abar, steps)
    assert ts[0] == 80 and c[0] > 0                                # leading spacing: t_0 = 4 * (100 // 5)
    m = np.array([1.5, -2.0])
    grad = -(1.0 + ts[0] / T) * (x_T - m)                          # by hand, at the shared state x_T
    np.testing.assert_array_equal(guided[:, 0], plain[:, 0])        # the same start
    # float64 end to end (the float32 weights are promoted): the update agrees to rounding
    np.testing.assert_allclose(guided[:, 1] - plain[:, 1], scale * c[0] * grad, rtol=1e-9, atol=1e-12)
    # sign: a positive scale moves up the gradient, a negative one down it (the step is large at
    # t = 80, where 1 / sqrt(abar) ~ 3.5, so r itself can overshoot its maximum: the direction is the claim)
    along = np.sum((guided[:, 1] - plain[:, 1]) * grad, axis=1)
    assert np.all(np.sign(along) == np.sign(scale)), along


# --------------------------------------------------------------------------------------------
# through a reward folder
# --------------------------------------------------------------------------------------------

def write_reward(path, shape=(2,), T_train=T, t_range=(0, T - 1), seed=0, y_std=3.0):
    """A random-weight RewardNet folder (reward-train's format); y_std scales its gradient."""
    cfg = network_config(shape, hidden=16, depth=2, temb=8)
    net = build_network(shape, cfg)
    params = init_params(net, seed)
    meta = reward_meta(shape, T_train, t_range, "local_scaling", cfg,
                       {"z_mean": 0.1, "z_std": 2.0, "y_mean": 1.0, "y_std": y_std})
    save_reward(str(path), params, meta)
    return str(path)


def lat(kind="sampled", guidance=None, steps=4, count=7, batch_size=3, **kw):
    section = {"kind": kind, "model": DDPM, "sampler": {"kind": "ddim", "steps": steps}, "count": count, "seed": 5,
               "batch_size": batch_size, **kw}
    if guidance is not None:
        section["guidance"] = guidance
    return section


def build(section):
    return build_latents(validate_spec({"model": DDPM, "latents": section, "descriptors": {"local_rank": {}}})["latents"])


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    return write_reward(tmp_path_factory.mktemp("reward") / "r")


def test_a_folder_reward_moves_the_first_state_by_its_own_gradient(gen, reward_dir):
    """A trajectory job's step-1 states, guided minus unguided = scale * c_0 * grad r(x_T, t_0), with
    grad r taken here from the folder's Reward (float32 sampler: agreement to ~1e-5)."""
    from geomjobs.sampling.reward_net import load_reward

    scale, steps, n = 2.0, 4, 5
    plain = build(lat("trajectory", steps=steps, count=n))
    guided = build(lat("trajectory", steps=steps, count=n, guidance={"reward": reward_dir, "scale": scale}))
    ids = np.arange(n) * (steps + 1)
    x_T = plain.latents(ids)
    np.testing.assert_array_equal(guided.latents(ids), x_T)
    d = guided.latents(ids + 1) - plain.latents(ids + 1)
    rw = load_reward(reward_dir)
    ts, c = step_gain(gen.denoiser.abar, steps)
    g = np.asarray(jax.vmap(jax.grad(lambda z: rw.apply(rw.params, z[None], jnp.full((1,), ts[0]))[0]))(
        jnp.asarray(x_T, jnp.float32)), np.float64)
    want = scale * c[0] * g
    assert np.abs(want).max() > 1e-2                                # a move well above float32 rounding
    np.testing.assert_allclose(d, want, rtol=0, atol=2e-5)
    assert list(guided.columns(ids)["guidance_scale"]) == [scale] * n


def test_scale_zero_is_bitwise_the_unguided_sampler_and_the_guided_one_compiles_once(reward_dir):
    plain = build(lat(count=8))
    zero = build(lat(count=8, guidance={"reward": reward_dir, "scale": 0}))
    zero_w = build(lat(count=8, guidance={"reward": reward_dir, "scale": 0.0, "window": [0, 50]}))
    ids = np.arange(8)
    ref = plain.latents(ids)
    assert np.array_equal(zero.latents(ids), ref) and np.array_equal(zero_w.latents(ids), ref)
    assert zero.run.guide is not None and not zero.run.guide.active
    g = build(lat(count=8, guidance={"reward": reward_dir, "scale": 1.0}))
    for chunk in (np.arange(0, 3), np.arange(3, 8), np.array([6, 1])):      # full batches and a padded tail
        g.latents(chunk)
    assert g.run.compiled_count() == 1
    assert np.abs(g.latents(ids) - ref).max() > 1e-3
    # a window with no sampler timestep in it guides nothing (leading timesteps 75, 50, 25, 0)
    none = build(lat(count=8, guidance={"reward": reward_dir, "scale": 1.0, "window": [26, 49]}))
    np.testing.assert_array_equal(none.latents(ids), ref)


def test_the_reward_travels_with_the_pickled_source(tmp_path):
    folder = write_reward(tmp_path / "r2", seed=3)
    src = build(lat(count=6, guidance={"reward": folder, "scale": -1.5}))
    want = src.latents(np.arange(6))
    blob = pickle.dumps(src)
    shutil.rmtree(folder)                                           # a worker elsewhere cannot see it
    back = pickle.loads(blob)
    assert back.run._gen is None
    np.testing.assert_array_equal(back.latents(np.arange(6)), want)


@pytest.mark.slow     # ~1 min for the Ray start; the pickle test above covers what travels
def test_a_guided_job_runs_in_process_and_on_ray_alike(tmp_path, reward_dir, monkeypatch):
    import pandas as pd

    from geomjobs import run_job

    spec = {"model": DDPM, "latents": lat(count=6, guidance={"reward": reward_dir, "scale": 2.0}, save_latent=True),
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}}, "execution": {"shard_size": 3, "batch_size": 3}}
    monkeypatch.setenv("GEOMJOBS_LOCAL_MODE", "process")
    a = run_job(spec, str(tmp_path / "local"))
    monkeypatch.setenv("GEOMJOBS_LOCAL_MODE", "ray")
    b = run_job({**spec, "execution": {**spec["execution"], "workers": 2}}, str(tmp_path / "ray"))
    assert a.ok and b.ok
    da = pd.read_parquet(tmp_path / "local").sort_values("sample_id")
    db = pd.read_parquet(tmp_path / "ray").sort_values("sample_id")
    assert np.array_equal(np.stack(da.z), np.stack(db.z)) and list(da.guidance_scale) == [2.0] * 6


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bad_rewards(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    return {"shape": write_reward(root / "shape", shape=(3,)), "T": write_reward(root / "T", T_train=1000, t_range=(0, 999)),
            "early": write_reward(root / "early", t_range=(0, 10)), "empty": str(root / "empty"), "missing": str(root / "nope")}


BAD = [
    ("missing", {}, "latents.guidance.reward", "does not exist"),
    ("empty", {}, "latents.guidance.reward", "not a reward folder"),
    ("shape", {}, "latents.guidance.reward", "shape [3]"),
    ("T", {}, "latents.guidance.reward", "T = 100"),
    ("early", {}, "latents.guidance.reward", "trained on t in [0, 10]"),
    ("early", {"window": [0, 60]}, "latents.guidance.window", "t = [25, 50]"),
    ("early", {"window": [9, 3]}, "latents.guidance.window", "lo <= hi"),
]


@pytest.mark.parametrize("kind", ["sampled", "trajectory"])
@pytest.mark.parametrize("which,extra,key,msg", BAD, ids=[f"{b[0]}-{b[2].split('.')[-1]}" for b in BAD])
def test_bad_guidance_names_its_key(bad_rewards, kind, which, extra, key, msg):
    spec = {"model": {**DDPM, "timestep": 0}, "latents": lat(kind, guidance={"reward": bad_rewards[which], "scale": 1.0, **extra}),
            "descriptors": {"local_rank": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == key and msg in e.value.message, e.value


def test_an_early_reward_is_fine_within_its_window(bad_rewards):
    src = build(lat(guidance={"reward": bad_rewards["early"], "scale": 1.0, "window": [0, 10]}))
    assert src.run.guide.window == (0, 10)


def test_a_missing_reward_exits_2_from_the_cli_before_work(tmp_path, capsys):
    from geomjobs.cli import main

    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": DDPM, "latents": lat(guidance={"reward": str(tmp_path / "no-such"), "scale": 1.0}),
                                 "descriptors": {"local_rank": {}}}))
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "latents.guidance.reward" in err and "no-such" in err
    assert not (tmp_path / "out").exists()
