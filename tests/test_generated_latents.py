"""latents: {kind: sampled} and {kind: trajectory} (SPEC section 6) on the shipped ddpm-gmm2d and
on the tiny random-weight diffusers pipeline: samples land on the data, every sample depends only
on (seed, i), a trajectory ends at the sampled latent, and bad specs name their key before work."""
from __future__ import annotations

import pickle

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from geomjobs import run_job, sampling
from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.latents import build_latents
from geomjobs.runner.plan import plan_job
from geomjobs.spec import validate_spec
from geomjobs.zoo.gmm2d import gmm_modes, mode_stats

DDPM = {"kind": "zoo", "name": "ddpm-gmm2d"}


def lat(kind="sampled", **kw):
    base = {"kind": kind, "model": DDPM, "sampler": {"kind": "ddim", "steps": 20}, "count": 64, "seed": 3}
    return {**base, **kw}


def build(section):
    return build_latents(validate_spec({"model": DDPM, "latents": section, "descriptors": {"local_rank": {}}})["latents"])


# --------------------------------------------------------------------------------------------
# sampled
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [{"kind": "ddim", "steps": 50}, {"kind": "ddim", "steps": 50, "eta": 1.0},
                                     {"kind": "dpmpp2m", "steps": 20}])
def test_sampled_ddpm_gmm2d_lands_on_the_eight_modes(sampler):
    """The data are 8 Gaussians (std 0.3) on the circle of radius 4: 95% of 400 samples lie within
    1.0 (3.3 std) of a mode, and every mode gets at least 5% of them (1/8 expected)."""
    src = build(lat(sampler=sampler, count=400, seed=0))
    assert src.count == 400 and src.shape == (2,)
    z = src.latents(np.arange(400))
    assert z.shape == (400, 2) and z.dtype == np.float64
    stats = mode_stats(z, gmm_modes(), radius=1.0)
    assert stats["frac_near"] >= 0.95 and stats["min_mode_share"] >= 0.05, stats


def test_sampled_latents_are_the_sampler_run_from_the_gaussian_latent_of_the_same_seed():
    src = build(lat(count=8, seed=5))
    gen = build_generator(DDPM)
    x_T = build_latents({"kind": "gaussian", "count": 8, "shape": [2], "seed": 5}).latents(np.arange(8))
    ref = sampling.batch_sampler(gen.denoiser, sampling.Sampler("ddim", 20))(gen.params, jnp.asarray(x_T, jnp.float32))
    np.testing.assert_array_equal(src.latents(np.arange(8)), np.asarray(ref, np.float64))


def test_samples_do_not_depend_on_which_ids_are_asked_together_or_on_pickling():
    """The same batch size: bit-identical whatever the id set (shards), its order or the process
    (a pickled source rebuilds its model); another sampler batch size: equal to float32 rounding."""
    for sampler in ({"kind": "ddim", "steps": 20, "eta": 0.7}, {"kind": "dpmpp2m", "steps": 10}):
        a = build(lat(sampler=sampler, batch_size=16))
        full = a.latents(np.arange(64))
        np.testing.assert_array_equal(a.latents(np.arange(30, 45)), full[30:45])
        np.testing.assert_array_equal(a.latents(np.array([63, 2, 17])), full[[63, 2, 17]])
        b = pickle.loads(pickle.dumps(a))
        assert b.run._gen is None                          # the model is not pickled
        np.testing.assert_array_equal(b.latents(np.arange(5, 25)), full[5:25])
        other = build(lat(sampler=sampler, batch_size=5)).latents(np.arange(3, 40))
        np.testing.assert_allclose(other, full[3:40], rtol=0, atol=1e-5)
        # and a different seed is a different sample
        assert np.abs(build(lat(sampler=sampler, seed=4)).latents(np.arange(4)) - full[:4]).min() > 0


def test_sampled_columns_and_resolved_defaults():
    src = build(lat(count=6, save_latent=True))
    ids = np.array([1, 4])
    cols = src.columns(ids)
    assert list(cols["noise_seed"]) == [3, 3] and cols["noise_seed"].dtype == np.int64
    assert list(cols["guidance_scale"]) == [0.0, 0.0]
    np.testing.assert_array_equal(np.asarray(cols["z"]), src.latents(ids))
    assert "z" not in build(lat(count=6)).columns(ids)
    section = lat(count=6)
    r = build(section).resolved
    assert r["sampler"] == {"kind": "ddim", "steps": 20, "eta": 0.0} and r["batch_size"] == 16 and r["save_latent"] is False
    assert section == lat(count=6)                         # the builder leaves the section as it is
    assert build({"kind": "sampled", "model": DDPM, "count": 2}).resolved["sampler"] == {"kind": "ddim", "steps": 50, "eta": 0.0}


# --------------------------------------------------------------------------------------------
# trajectory
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", [{"kind": "ddim", "steps": 20}, {"kind": "ddim", "steps": 20, "eta": 0.5},
                                     {"kind": "dpmpp2m", "steps": 20}])
def test_a_trajectory_runs_from_the_initial_noise_to_the_sampled_latent(sampler):
    steps, n = sampler["steps"], 5
    traj, samp = build(lat("trajectory", sampler=sampler, count=n)), build(lat(sampler=sampler, count=n))
    assert traj.count == n * (steps + 1) and traj.shape == (2,)
    ids = np.arange(traj.count)
    states = traj.latents(ids).reshape(n, steps + 1, 2)
    np.testing.assert_array_equal(states[:, -1], samp.latents(np.arange(n)))          # bit-identical
    x_T = np.stack([sampling.initial_noise(3, i, (2,)) for i in range(n)])
    np.testing.assert_array_equal(states[:, 0], x_T.astype(np.float32).astype(np.float64))
    cols = traj.columns(ids)
    np.testing.assert_array_equal(cols["trajectory_id"], np.repeat(np.arange(n), steps + 1))
    np.testing.assert_array_equal(cols["step"], np.tile(np.arange(steps + 1), n))
    assert set(cols["noise_seed"]) == {3} and set(cols["guidance_scale"]) == {0.0}
    ts = traj.denoiser_timesteps(ids)
    assert ts.dtype == np.int64
    np.testing.assert_array_equal(ts[:steps + 1], np.append(sampling.timesteps(100, steps), 0))
    # any subset of records (a shard boundary inside a trajectory) gives the same states
    sub = np.array([7, 20, 21, 22, 60, 104])
    np.testing.assert_array_equal(traj.latents(sub), traj.latents(ids)[sub])
    np.testing.assert_array_equal(traj.denoiser_timesteps(sub), ts[sub])


@pytest.mark.parametrize("sampler", [{"kind": "ddim", "steps": 6, "eta": 0.5}, {"kind": "dpmpp2m", "steps": 6}])
def test_consecutive_shards_sample_a_trajectory_they_share_once_with_the_same_records(sampler):
    """Shards cut inside trajectories: the next shard reuses the cut trajectory's states (sampled
    once, not once per shard), bit for bit what a fresh source computes for that shard alone."""
    n, per = 9, 7
    traj = build(lat("trajectory", sampler=sampler, count=n, batch_size=4))
    asked = []
    generate = traj.run.generate
    traj.run.generate = lambda seed, idx, record: asked.append(list(idx)) or generate(seed, idx, record)
    bounds = [0, 10, 24, 25, 40, n * per]            # cuts inside trajectories 1, 3, 3 and 5
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        ids = np.arange(lo, hi)
        fresh = build(lat("trajectory", sampler=sampler, count=n, batch_size=4))
        np.testing.assert_array_equal(traj.latents(ids), fresh.latents(ids))
    assert sorted(sum(asked, [])) == list(range(n))     # every trajectory sampled exactly once
    # only the previous call's cut ends are kept: ids elsewhere sample their own trajectories
    asked.clear()
    np.testing.assert_array_equal(traj.latents(np.arange(3, 12)), build(lat("trajectory", sampler=sampler, count=n,
                                                                            batch_size=4)).latents(np.arange(3, 12)))
    assert asked == [[0, 1]]


def test_trajectory_states_are_one_sampler_step_apart():
    """States j and j + 1 of a DDIM trajectory: j + 1 = ddim_step(j, eps_theta(j, t_j)) (float32)."""
    from geomjobs import diffusion
    gen, steps = build_generator(DDPM), 8
    traj = build(lat("trajectory", sampler={"kind": "ddim", "steps": steps}, count=2))
    s = traj.latents(np.arange(steps + 1))
    t = traj.denoiser_timesteps(np.arange(steps + 1))
    ab = gen.denoiser.abar
    for j in range(steps):
        eps = np.asarray(gen.denoiser.eps(gen.params, jnp.asarray(s[j], jnp.float32), jnp.int32(t[j])), np.float64)
        nxt = diffusion.ddim_step(s[j], eps, ab[t[j]], ab[t[j + 1]] if j < steps - 1 else 1.0)
        np.testing.assert_allclose(s[j + 1], nxt, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# jobs
# --------------------------------------------------------------------------------------------

def test_a_sampled_job_writes_the_generated_latents_and_their_descriptors(tmp_path):
    """psi / nu of the DDPM's x0 prediction at t = 0 at each generated latent, against the
    source's own latents and the exact 2 x 2 Jacobian; records carry noise_seed, guidance_scale, z."""
    import jax
    spec = {"model": {**DDPM, "timestep": 0, "prediction": "x0"},
            "latents": lat(count=10, save_latent=True),
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": 4, "batch_size": 3}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df = pd.read_parquet(tmp_path / "out").sort_values("sample_id").reset_index(drop=True)
    z = build(lat(count=10)).latents(np.arange(10))
    np.testing.assert_array_equal(np.stack(df.z.to_numpy()), z)
    assert (df.noise_seed == 3).all() and (df.guidance_scale == 0.0).all() and df.trajectory_id.isna().all()
    assert df.cfg_scale.isna().all()                                  # no classifier-free guidance anywhere
    gen = build_generator(spec["model"])
    for i in range(10):
        s = np.linalg.svd(np.asarray(jax.jacfwd(lambda x: gen.apply(gen.params, x))(jnp.asarray(z[i], jnp.float32)), np.float64),
                          compute_uv=False)
        np.testing.assert_allclose(df.local_scaling[i], np.log(s).sum(), rtol=0, atol=1e-4)


def test_a_trajectory_job_measures_the_denoiser_at_each_records_own_timestep(tmp_path):
    """psi / nu of the DDPM's x0 prediction along 3 trajectories of DDIM-10, each record at its own
    state and timestep (step 10, the generated latent, at t = 0), against the exact 2 x 2
    Jacobian of x0_hat(x, t) = (x - sqrt(1 - abar_t) eps(x, t)) / sqrt(abar_t) at a few steps."""
    import jax

    from geomjobs import diffusion
    steps = 10
    latents = lat("trajectory", sampler={"kind": "ddim", "steps": steps}, count=3, save_latent=True)
    spec = {"model": {**DDPM, "prediction": "x0"}, "latents": latents,
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": 7, "batch_size": 4}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df = pd.read_parquet(tmp_path / "out").sort_values("sample_id").reset_index(drop=True)
    n = 3 * (steps + 1)
    assert list(df.sample_id) == list(range(n))
    assert list(df.trajectory_id) == list(np.repeat(np.arange(3), steps + 1))
    assert list(df.step) == list(np.tile(np.arange(steps + 1), 3))
    src = build(latents)
    np.testing.assert_array_equal(df.timestep.to_numpy(np.int64), src.denoiser_timesteps(np.arange(n)))
    np.testing.assert_array_equal(np.stack(df.z.to_numpy()), src.latents(np.arange(n)))
    gen = build_generator(DDPM)
    for i in (0, 4, 10, 11 + 3, 32):
        t, x = int(df.timestep[i]), jnp.asarray(df.z[i], jnp.float32)
        ab = float(gen.denoiser.abar[t])
        x0 = lambda v: diffusion.x0_from_eps(v, gen.denoiser.eps(gen.params, v, jnp.int32(t)), ab)  # noqa: E731, B023
        sv = np.linalg.svd(np.asarray(jax.jacfwd(x0)(x), np.float64), compute_uv=False)
        np.testing.assert_allclose(df.local_scaling[i], np.log(sv).sum(), rtol=0, atol=1e-4)
        p = sv / sv.sum()
        np.testing.assert_allclose(df.local_rank[i], np.exp(-(p * np.log(p)).sum()), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# bad input: SpecError naming the key, before any work
# --------------------------------------------------------------------------------------------

BAD = [
    (dict(model={"kind": "zoo", "name": "vae-digits"}), "latents.model", "has no noise prediction"),
    (dict(sampler={"kind": "ddim", "steps": 0}), "latents.sampler.steps", ">= 1"),
    (dict(sampler={"kind": "euler", "steps": 10}), "latents.sampler.kind", "ddim"),
    (dict(sampler={"kind": "ddim", "steps": 10, "eta": 1.5}), "latents.sampler.eta", "<= 1"),
    (dict(sampler={"kind": "ddim", "steps": 10, "eta": -0.1}), "latents.sampler.eta", ">= 0"),
    (dict(sampler={"kind": "dpmpp2m", "steps": 10, "eta": 0.5}), "latents.sampler.eta", "ddim sampler only"),
    (dict(sampler={"kind": "ddim", "steps": 101}), "latents.sampler.steps", "at most T = 100"),
    (dict(guidance={"reward": "r/", "scale": 2.0}), "latents.guidance.reward", "does not exist"),
    (dict(guidance={"scale": 0}), "latents.guidance.reward", "is required"),
    (dict(guidance={"reward": "r/", "scale": 0, "window": [5, 1]}), "latents.guidance.window", "lo <= hi"),
    (dict(model={"kind": "gan"}), "latents.model.kind", "expected one of"),
    (dict(model={"kind": "zoo"}), "latents.model.name", "is required"),
    (dict(model={"kind": "zoo", "name": "nope"}), "latents.model.name", "unknown zoo model"),
    (dict(model={"kind": "zoo", "name": "ddpm-gmm2d", "bogus": 1}), "latents.model.bogus", "not a known key"),
    (dict(count=0), "latents.count", ">= 1"),
    (dict(seed=-1), "latents.seed", ">= 0"),
    (dict(shape=[2]), "latents.shape", "not a known key"),
]


@pytest.mark.parametrize("kind", ["sampled", "trajectory"])
@pytest.mark.parametrize("change,key,msg", BAD, ids=[b[1] + ":" + b[2][:12] for b in BAD])
def test_bad_generated_latents_name_the_key(kind, change, key, msg):
    spec = {"model": {**DDPM, "timestep": 0}, "latents": lat(kind, **change), "descriptors": {"local_rank": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == key and msg in e.value.message, e.value


def test_latents_whose_shape_is_not_the_descriptor_models_are_refused():
    """ddpm-gmm2d samples (2,) latents; the vae-digits decoder takes (8,)."""
    spec = {"model": {"kind": "zoo", "name": "vae-digits"}, "latents": lat(), "descriptors": {"local_rank": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == "latents.shape" and "[8]" in e.value.message and "[2]" in e.value.message


def test_a_bad_spec_exits_2_from_the_cli(tmp_path, capsys):
    import yaml

    from geomjobs.cli import main
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"model": DDPM, "latents": lat(guidance={"reward": "r/", "scale": 1.0}),
                                 "descriptors": {"local_rank": {}}}))
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 2
    assert "latents.guidance.reward" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# diffusers-unet: its Denoiser, and UNet sampling -> VAE decoder psi on the tiny pipeline
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers_tiny import quiet, write_pipeline
    quiet()
    return write_pipeline(tmp_path_factory.mktemp("pipe"))


def unet_model(pipe, **kw):
    return {"kind": "diffusers-unet", "path": str(pipe["root"]), "subfolder": "unet",
            "prompt_embeddings": str(pipe["root"] / "prompts.npz"), **kw}


@pytest.mark.parametrize("extra", [pytest.param({}, marks=pytest.mark.slow),   # the CFG case below covers the same path
                                   {"cfg_scale": 7.5, "negative_embedding_index": 0, "prompt_index": 1}])
def test_the_unet_denoiser_is_the_generators_eps_at_every_timestep(pipe, extra):
    """Denoiser.eps at a traced t equals the eps generator built at that timestep (same prompt, CFG)."""
    import jax
    z = jnp.asarray(np.random.default_rng(0).standard_normal((4, 4, 4)), jnp.float32)
    den = build_generator(unet_model(pipe, timestep=0, **extra)).denoiser
    assert den is not None and den.num_timesteps == 1000
    eps = jax.jit(den.eps)
    for t in (0, 321, 999):
        gen = build_generator(unet_model(pipe, timestep=t, **extra))
        np.testing.assert_allclose(np.asarray(eps(gen.params, z, jnp.int32(t))), np.asarray(gen.apply(gen.params, z)),
                                   rtol=1e-5, atol=1e-5)


def test_a_unet_without_a_schedule_has_no_noise_prediction(pipe, tmp_path):
    from diffusers_tiny import write_pipeline
    bare = write_pipeline(tmp_path / "bare", vae=False, scheduler=None)
    spec = {"model": {"kind": "zoo", "name": "vae-digits"},
            "latents": {"kind": "sampled", "model": unet_model(bare), "count": 2}, "descriptors": {"local_rank": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == "latents.model" and "no noise prediction" in e.value.message


def test_unet_sampling_then_vae_decoder_descriptors_on_the_tiny_pipeline(pipe, tmp_path):
    """SD's recipe in miniature: DDIM on the UNet (prompt 2, CFG) -> the decoder's psi / nu at each
    generated latent, against the dense-Jacobian reference at the source's latents."""
    from diffusers_tiny import record_psi_nu
    model = unet_model(pipe, prompt_index=2, cfg_scale=3.0, negative_embedding_index=0)
    latents = {"kind": "sampled", "model": model, "sampler": {"kind": "ddim", "steps": 4}, "count": 3, "seed": 1,
               "batch_size": 2}
    vae = {"kind": "diffusers-vae-decoder", "path": str(pipe["root"]), "subfolder": "vae"}
    spec = {"model": vae, "latents": latents,
            "descriptors": {"local_scaling": {"mode": "projection", "k": 6, "chunk": 6}, "local_rank": {}},
            "execution": {"shard_size": 2, "batch_size": 2}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df = pd.read_parquet(tmp_path / "out").sort_values("sample_id").reset_index(drop=True)
    assert list(df.prompt_id) == [2, 2, 2] and (df.noise_seed == 1).all()
    # the sampler's classifier-free guidance is recorded as cfg_scale, not as the reward guidance's guidance_scale
    assert (df.cfg_scale == 3.0).all() and (df.guidance_scale == 0.0).all()
    z = build_latents(latents).latents(np.arange(3))
    assert z.shape == (3, 4, 4, 4) and np.isfinite(z).all()
    W = np.load(tmp_path / "out" / "_artifacts" / "projections.npz")["W"]
    ref = record_psi_nu(build_generator(vae), z, W)
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=1e-3)


def test_the_cluster_sampled_specs_latents_models_pass_the_model_schema():
    """cluster/jobs specs with generated latents: the whole spec passes the schema (test_cluster_configs),
    and latents.model passes the model section's own rules (checked when planned)."""
    from pathlib import Path

    from geomjobs.latents.generated import _model_section
    from geomjobs.spec import load_spec
    specs = [load_spec(p) for p in sorted((Path(__file__).parents[1] / "cluster" / "jobs").glob("*.yaml"))]
    generated = [s for s in specs if s["latents"]["kind"] in ("sampled", "trajectory")]
    assert generated
    for s in generated:
        _model_section(s["latents"])
