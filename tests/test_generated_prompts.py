"""Per-sample prompts in one sampled / trajectory job (``latents.prompts: {seeds_per_prompt: k}``,
geomjobs.latents.generated) on the tiny random-weight diffusers pipeline: sample i of a prompts x
seeds sweep is sample i % k of the single-prompt job of prompt prompt_index + i // k; the records
carry their own prompt; a single-prompt job runs the program it ran before; bad input names its key."""
from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from geomjobs import run_job, sampling
from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.latents import build_latents
from geomjobs.runner.plan import plan_job
from geomjobs.spec import validate_spec

STEPS = 2
NEG = 4            # the negative (unconditional) prompt's row, outside the swept rows 0..2
# Per-sample contexts make the UNet's cross-attention a batched contraction instead of one shared
# context broadcast over the batch, so XLA may sum in another order: float32 rounding (~1e-7
# relative) through 2 DDIM steps of a random-weight UNet with O(1) latents stays far below 1e-4.
TOL = 1e-4


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from diffusers_tiny import TINY_UNET, quiet, write_pipeline, write_prompts
    quiet()
    root = tmp_path_factory.mktemp("pipe")
    out = write_pipeline(root, vae=True)
    # 5 prompts with ids 100..104 (a Parquet file would carry them; an .npz gives row numbers, so the
    # ids below are checked against the rows)
    out["emb"] = write_prompts(root / "prompts5.npz", num_prompts=5, dim=TINY_UNET["cross_attention_dim"], seed=1)
    return out


def unet(pipe, **kw):
    return {"kind": "diffusers-unet", "path": str(pipe["root"]), "subfolder": "unet",
            "prompt_embeddings": str(pipe["root"] / "prompts5.npz"), **kw}


def cfg(**kw):
    return {"cfg_scale": 3.0, "negative_embedding_index": NEG, **kw}


def section(pipe, model, kind="sampled", sampler=None, **kw):
    return {"kind": kind, "model": model, "sampler": sampler or {"kind": "ddim", "steps": STEPS}, "seed": 5, **kw}


def build(sec):
    vae = {"kind": "diffusers-vae-decoder", "path": "unused", "subfolder": "vae"}
    return build_latents(validate_spec({"model": vae, "latents": sec, "descriptors": {"local_rank": {}}})["latents"])


@pytest.fixture(scope="module")
def singles(pipe):
    """The single-prompt sources of prompts 0..2 (CFG against row NEG) and their samples 0, 1."""
    out = {}
    for p in range(3):
        src = build(section(pipe, unet(pipe, prompt_index=p, **cfg()), count=2, batch_size=4))
        out[p] = (src, src.latents(np.arange(2)))
    return out


def sweep_section(pipe, **kw):
    return section(pipe, unet(pipe, **cfg()), count=6, prompts={"seeds_per_prompt": 2}, batch_size=4, **kw)


def test_a_sweep_job_of_3_prompts_x_2_seeds_is_3_single_prompt_jobs(pipe, singles, tmp_path):
    """One job over rows 0..2 x 2 seeds, shards of 3 (prompt 1's samples cut across shards 0 and 1):
    each record carries its prompt, its z is that prompt's single-prompt sample, and the decoder's
    psi at it is the dense-Jacobian reference."""
    from diffusers_tiny import record_psi_nu
    vae = {"kind": "diffusers-vae-decoder", "path": str(pipe["root"]), "subfolder": "vae"}
    spec = {"model": vae, "latents": sweep_section(pipe, save_latent=True),
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4, "chunk": 4}, "local_rank": {}},
            "execution": {"shard_size": 3, "batch_size": 2}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok and res.rows == 6, res
    df = pd.read_parquet(tmp_path / "out").sort_values("sample_id").reset_index(drop=True)
    assert list(df.prompt_id) == [0, 0, 1, 1, 2, 2] and (df.noise_seed == 5).all() and (df.guidance_scale == 0).all()
    assert (df.cfg_scale == 3.0).all()          # the sweep's classifier-free guidance, per record
    z = np.stack(df.z).reshape(6, 4, 4, 4)
    for p in range(3):
        np.testing.assert_allclose(z[2 * p:2 * p + 2], singles[p][1], rtol=0, atol=TOL)
    # the prompts matter: different prompts from the same noise, or one prompt's two noises, differ
    assert np.abs(z[0] - z[2]).max() > 1e-3 and np.abs(z[0] - z[1]).max() > 1e-3
    W = np.load(tmp_path / "out" / "_artifacts" / "projections.npz")["W"]
    ref = record_psi_nu(build_generator(vae), z, W)
    # z is the float32 sample stored as float64; psi from the float32 decoder's Jacobian: 1e-3
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=1e-3)


def test_sweep_samples_do_not_depend_on_which_ids_are_asked_together_or_on_pickling(pipe, singles):
    a = build(sweep_section(pipe))
    full = a.latents(np.arange(6))
    np.testing.assert_allclose(full[2:4], singles[1][1], rtol=0, atol=TOL)
    # the same batch size: bit for bit whatever ids are asked together, and in a rebuilt copy
    np.testing.assert_array_equal(a.latents(np.array([5, 1, 3])), full[[5, 1, 3]])
    b = pickle.loads(pickle.dumps(a))
    assert b.run._gen is None and b.run.prompts._table is None       # neither model nor embeddings pickled
    np.testing.assert_array_equal(b.latents(np.arange(2, 6)), full[2:6])
    assert a.run.compiled_count() == 1                                # one program for every batch
    assert list(a.columns(np.arange(6))["prompt_id"]) == [0, 0, 1, 1, 2, 2]
    # a trajectory sweep ends at the sweep's samples, each state with its trajectory's prompt
    traj = build(sweep_section(pipe, kind="trajectory"))
    last = np.arange(6) * (STEPS + 1) + STEPS
    np.testing.assert_array_equal(traj.latents(last), full)
    assert list(traj.columns(np.arange(6 * (STEPS + 1)))["prompt_id"]) == sum(([p] * 2 * (STEPS + 1) for p in range(3)), [])


@pytest.mark.slow
def test_a_stochastic_sweep_draws_each_prompts_step_noise_from_its_noise_index(pipe):
    sampler = {"kind": "ddim", "steps": STEPS, "eta": 0.6}
    z = build({**sweep_section(pipe), "sampler": sampler}).latents(np.arange(6))
    for p in range(3):
        single = build(section(pipe, unet(pipe, prompt_index=p, **cfg()), sampler=sampler, count=2, batch_size=4))
        np.testing.assert_allclose(z[2 * p:2 * p + 2], single.latents(np.arange(2)), rtol=0, atol=TOL)


def test_a_single_prompt_job_runs_the_shared_context_program_bit_for_bit(pipe, singles):
    """Without latents.prompts the sampler is the one it was: batch_sampler over the generator's
    params (one context for the batch), sample i from default_rng([seed, i]) noise, tail padded
    with sample 0."""
    src, z = singles[1]
    gen = src.run.gen
    fn = sampling.batch_sampler(gen.denoiser, sampling.Sampler("ddim", STEPS, 0.0))
    x = np.stack([sampling.initial_noise(5, i, gen.latent_shape) for i in [0, 1, 0, 0]]).astype(np.float32)
    np.testing.assert_array_equal(z, np.asarray(fn(gen.params, x, None), np.float64)[:2])
    assert src.run.prompts is None and list(src.columns(np.arange(2))["prompt_id"]) == [1, 1]


def _raises(spec, key, msg):
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == key and msg in e.value.message, (e.value.key, e.value.message)


def job(pipe, lat, model=None):
    return {"model": model or {"kind": "diffusers-vae-decoder", "path": str(pipe["root"]), "subfolder": "vae"},
            "latents": lat, "descriptors": {"local_rank": {}}}


def test_bad_per_sample_prompts_name_the_key(pipe, tmp_path):
    sw = {"seeds_per_prompt": 2}
    _raises(job(pipe, section(pipe, unet(pipe, **cfg()), count=5, prompts=sw)), "latents.count", "multiple of 2")
    _raises(job(pipe, section(pipe, unet(pipe), count=12, prompts=sw)), "latents.count", "the file has 5 prompts")
    _raises(job(pipe, section(pipe, unet(pipe, prompt_index=3, **cfg()), count=4, prompts=sw)), "latents.count",
            "include the negative")
    _raises(job(pipe, section(pipe, unet(pipe, prompt_embeddings=str(tmp_path / "none.npz")), count=4, prompts=sw)),
            "latents.model.prompt_embeddings", "does not exist")
    _raises(job(pipe, section(pipe, unet(pipe), count=4, prompts={"seeds_per_prompt": 0})),
            "latents.prompts.seeds_per_prompt", "")
    zoo = {"kind": "zoo", "name": "ddpm-gmm2d"}
    _raises({"model": zoo, "latents": section(pipe, zoo, count=4, prompts=sw), "descriptors": {"local_rank": {}}},
            "latents.prompts", "diffusers-unet")
    # a trajectory job whose descriptor model is the (one-prompt) UNet cannot follow per-sample prompts (today
    # such a job is refused anyway, by model.timestep; this names the deeper reason first)
    _raises(job(pipe, section(pipe, unet(pipe), kind="trajectory", count=4, prompts=sw), model=unet(pipe, prediction="x0", timestep=0)),
            "latents.prompts", "prompt-conditioned")


def test_a_bad_sweep_exits_2_from_the_cli(pipe, tmp_path, capsys):
    import yaml

    from geomjobs.cli import main
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(job(pipe, section(pipe, unet(pipe), count=7, prompts={"seeds_per_prompt": 2}))))
    assert main(["run", str(p), "--out", str(tmp_path / "out")]) == 2
    assert "latents.count" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
