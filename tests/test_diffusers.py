"""kinds diffusers-vae-decoder and diffusers-unet on tiny random-weight models written with the real
``save_pretrained`` and loaded through the real ``from_pretrained`` (tests/diffusers_tiny.py).
Nothing is downloaded.

References: the generators against the diffusers modules called directly; singular values against
NumPy's SVD of the dense float64 Jacobian (itself checked against central finite differences); delta
against a brute-force count of SiLU inputs captured by patching flax's ``swish``; whole jobs read
back with pandas and compared record by record with the same references (tests/diffusers_tiny.py).
"""
import json
import os
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.geometry import exact_singular_values, local_rank, local_scaling, matrix_rank_rtol, orthonormal_rows
from geomjobs.geometry.spectrum import projected_rows, projected_singular_values
from geomjobs.spec import validate_spec

from diffusers_tiny import SD_SCHEDULER, brute_force_silu_flips, dense_reference, png_folder, quiet, record_psi_nu, write_pipeline
from references import psi_nu as ref_psi_nu

VAE = "diffusers-vae-decoder"
UNET = "diffusers-unet"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    quiet()
    return write_pipeline(tmp_path_factory.mktemp("pipe"))


def vae_spec(pipe, **kw):
    return {"kind": VAE, "path": str(pipe["root"]), "subfolder": "vae", **kw}


def unet_spec(pipe, **kw):
    return {"kind": UNET, "path": str(pipe["root"]), "subfolder": "unet", "timestep": 400,
            "prompt_embeddings": str(pipe["root"] / "prompts.npz"), **kw}


def abar(t):
    """alpha-bar from diffusers' own Flax scheduler (float32)."""
    state = diffusers.FlaxDDPMScheduler.from_config(SD_SCHEDULER).create_state()
    return float(state.common.alphas_cumprod[t])


# ------------------------------------------------------------------------------------------------
# (a) the generators are the diffusers modules
# ------------------------------------------------------------------------------------------------

def test_vae_decoder_is_diffusers_decode_and_latents_are_channels_first(pipe):
    vae, params = pipe["vae"]
    gen = build_generator(vae_spec(pipe))
    assert (gen.latent_shape, gen.output_shape) == ((4, 4, 4), (3, 8, 8))     # sample_size 8 / 2**(2-1)
    assert set(gen.params) == {"post_quant_conv", "decoder"}                  # the encoder is not carried
    z = jax.random.normal(jax.random.PRNGKey(1), (4, 4, 4), jnp.float32)
    out = jax.jit(gen.apply)(gen.params, z)
    assert out.dtype == jnp.float32
    # diffusers' documented NCHW call, on a latent whose width (5) differs from its 4 channels:
    # decode transposes NCHW -> NHWC only when latents.shape[-1] != latent_channels.
    gen35 = build_generator(vae_spec(pipe, latent_shape=[4, 3, 5]))
    z35 = jax.random.normal(jax.random.PRNGKey(2), (4, 3, 5), jnp.float32)
    direct = vae.apply({"params": params}, (z35 / 0.18215)[None], method=vae.decode).sample[0]
    np.testing.assert_allclose(jax.jit(gen35.apply)(gen35.params, z35), direct, rtol=1e-5, atol=1e-5)
    assert gen35.output_shape == (3, 6, 10)
    # 4 x 4 x 4: the NCHW call would be misread as NHWC; the explicit NHWC call is the reference
    nhwc = vae.apply({"params": params}, jnp.transpose(z / 0.18215, (1, 2, 0))[None], method=vae.decode).sample[0]
    np.testing.assert_allclose(out, nhwc, rtol=1e-5, atol=1e-5)


def test_unet_eps_x0_and_guidance_are_the_diffusers_unet(pipe):
    unet, params = pipe["unet"]
    emb = pipe["prompts"]
    t = 400
    z = jax.random.normal(jax.random.PRNGKey(3), (4, 4, 4), jnp.float32)
    e_cond, e_neg = jax.jit(lambda c: unet.apply({"params": params}, jnp.stack([z, z]), t, c).sample)(emb[1:3])

    eps = build_generator(unet_spec(pipe, prompt_index=1))
    assert eps.timestep == t and eps.prompt_id == 1 and eps.output_shape == (4, 4, 4)
    np.testing.assert_allclose(jax.jit(eps.apply)(eps.params, z), e_cond, rtol=1e-5, atol=1e-5)

    a = abar(t)
    x0 = build_generator(unet_spec(pipe, prompt_index=1, prediction="x0", cfg_scale=7.5, negative_embedding_index=2))
    guided = e_neg + 7.5 * (e_cond - e_neg)
    np.testing.assert_allclose(jax.jit(x0.apply)(x0.params, z), (z - np.sqrt(1 - a) * guided) / np.sqrt(a),
                               rtol=1e-4, atol=1e-4)

    # a v-prediction model (scheduler config given inline): x0 = sqrt(abar) z - sqrt(1 - abar) v
    v = build_generator(unet_spec(pipe, prompt_index=1, prediction="x0",
                                  scheduler_config={**SD_SCHEDULER, "prediction_type": "v_prediction"}))
    np.testing.assert_allclose(jax.jit(v.apply)(v.params, z), np.sqrt(a) * z - np.sqrt(1 - a) * e_cond,
                               rtol=1e-4, atol=1e-4)


def test_prompt_embeddings_from_parquet_keep_the_files_prompt_ids(pipe, tmp_path):
    """A Parquet file of text-encoder hidden states (one (seq, dim) list of lists per row, with a
    prompt_id column) gives the same UNet as the .npz, and records keep the file's prompt id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.asarray(pipe["prompts"], np.float32)
    ids = [70, 71, 72]
    pq.write_table(pa.table({"prompt_id": ids, "embedding": [e.tolist() for e in emb]}), tmp_path / "p.parquet")
    z = jax.random.normal(jax.random.PRNGKey(4), (4, 4, 4), jnp.float32)
    ref = build_generator(unet_spec(pipe, prompt_index=1, cfg_scale=3.0, negative_embedding_index=0))
    got = build_generator(unet_spec(pipe, prompt_index=1, cfg_scale=3.0, negative_embedding_index=0,
                                    prompt_embeddings=str(tmp_path / "p.parquet")))
    assert ref.prompt_id == 1 and got.prompt_id == 71
    np.testing.assert_array_equal(jax.jit(got.apply)(got.params, z), jax.jit(ref.apply)(ref.params, z))
    # without a prompt_id column the ids are the row numbers
    pq.write_table(pa.table({"embedding": [e.tolist() for e in emb]}), tmp_path / "q.parquet")
    assert build_generator(unet_spec(pipe, prompt_index=2, prompt_embeddings=str(tmp_path / "q.parquet"))).prompt_id == 2


@pytest.mark.parametrize("name,msg", [("r", "no column 'embedding'"), ("s", r"same \(seq, dim\) shape"),
                                      ("t", "lists of lists"), ("u", "not a readable Parquet file"),
                                      ("v", "does not exist")])
def test_bad_prompt_embedding_files_name_the_key(pipe, tmp_path, name, msg):
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = np.asarray(pipe["prompts"], np.float32)
    write = {"r": lambda p: pq.write_table(pa.table({"hidden": [e.tolist() for e in emb]}), p),
             "s": lambda p: pq.write_table(pa.table({"embedding": [emb[0].tolist(), emb[1][:3].tolist()]}), p),
             "t": lambda p: pq.write_table(pa.table({"embedding": [1.0, 2.0]}), p),
             "u": lambda p: p.write_bytes(b"not parquet"), "v": lambda p: None}
    write[name](tmp_path / f"{name}.parquet")
    with pytest.raises(SpecError, match=r"model.prompt_embeddings'.*" + msg):
        build_generator(unet_spec(pipe, prompt_embeddings=str(tmp_path / f"{name}.parquet")))


# ------------------------------------------------------------------------------------------------
# (b) psi and nu against the dense Jacobian
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae64(pipe):
    """The tiny decoder in float64 with remat: dots, a latent z and the dense Jacobian there."""
    gen = build_generator(vae_spec(pipe, dtype="float64", remat="dots"), "float64")
    z = jax.random.normal(jax.random.PRNGKey(4), (gen.latent_dim,), jnp.float64)
    return gen, z, dense_reference(gen, z)


@pytest.mark.parametrize("kind", [VAE, UNET])
def test_psi_nu_equal_numpy_svd_of_the_dense_jacobian(pipe, vae64, kind):
    """float64 model (x64 is on in tests): spectra agree with NumPy to ~1e-10. The VAE runs with
    remat: dots (jax.checkpoint must not change a number); exact mode is checked on the VAE
    (for the UNet it would only recompile the same jacfwd)."""
    if kind == VAE:
        gen, z, a = vae64
    else:
        gen = build_generator(unet_spec(pipe, dtype="float64", prediction="x0", cfg_scale=3.0,
                                        negative_embedding_index=0), "float64")
        z = jax.random.normal(jax.random.PRNGKey(4), (gen.latent_dim,), jnp.float64)
        a = dense_reference(gen, z)
    assert jax.tree_util.tree_leaves(gen.params)[0].dtype == jnp.float64
    assert a.shape == (gen.output_dim, gen.latent_dim)
    g = gen.flat_fn()
    if kind == VAE:
        psi, nu, _ = ref_psi_nu(a)
        s = jax.jit(lambda x: exact_singular_values(g, x))(z)
        tol = matrix_rank_rtol(*a.shape, np.float64)
        np.testing.assert_allclose(local_scaling(s, tol), psi, rtol=1e-9)
        np.testing.assert_allclose(local_rank(s, tol), nu, rtol=1e-9)
    k = 8
    w = orthonormal_rows(k, gen.output_dim, seed=0, stream="W")
    chunk = 3 if kind == VAE else None                   # 3 chunks, the last one padded
    sp = jax.jit(lambda x: projected_singular_values(g, x, jnp.asarray(w), chunk=chunk))(z)
    psi_w, nu_w, _ = ref_psi_nu(w @ a)
    tol = matrix_rank_rtol(k, gen.latent_dim, np.float64)
    np.testing.assert_allclose(local_scaling(sp, tol), psi_w, rtol=1e-9)
    np.testing.assert_allclose(local_rank(sp, tol), nu_w, rtol=1e-9)


def test_bfloat16_decoder_runs_bf16_and_returns_float32_singular_values(pipe, vae64):
    """bf16 params/activations, float32 output, VJP rows and SVD. bf16 keeps 8 bits of mantissa
    (relative rounding 2^-9 = 0.2% per op); through ~15 layers the decoder's output and the
    projected singular values move by about 1%, so psi (a sum of 8 logs) by a few 0.01: we allow
    5% on each singular value and 0.15 on psi (against the float64 dense reference), and check
    the bf16 values are not float32-accurate."""
    _, z64, a = vae64
    g16 = build_generator(vae_spec(pipe, dtype="bfloat16"))
    assert {a.dtype for a in jax.tree_util.tree_leaves(g16.params)} == {jnp.dtype(jnp.bfloat16)}
    w = orthonormal_rows(8, g16.output_dim, seed=0, stream="W")
    z = jnp.asarray(z64, jnp.float32)
    rows = jax.jit(lambda x: projected_rows(g16.flat_fn(), x, jnp.asarray(w, jnp.float32)))(z)
    assert rows.dtype == jnp.float32 and jax.eval_shape(g16.flat_fn(), z).dtype == jnp.float32
    s16 = jnp.linalg.svd(rows, compute_uv=False)
    s64 = np.linalg.svd(w @ a, compute_uv=False)
    np.testing.assert_allclose(s16, s64, rtol=5e-2)
    assert abs(float(local_scaling(s16, matrix_rank_rtol(8, 64, np.float32))) - ref_psi_nu(w @ a)[0]) < 0.15
    assert np.max(np.abs(s16 / s64 - 1)) > 1e-4


# ------------------------------------------------------------------------------------------------
# (c) local complexity against a brute-force count
# ------------------------------------------------------------------------------------------------

def test_local_complexity_of_the_decoder_equals_a_brute_force_count(pipe, monkeypatch):
    """delta is counted on the generator with remat: full (the counter must see through
    jax.checkpoint); the brute force taps the same decoder without it."""
    import geomjobs.geometry.complexity as cx

    gen = build_generator(vae_spec(pipe, dtype="float64"), "float64")
    z = jax.random.normal(jax.random.PRNGKey(7), gen.latent_shape, jnp.float64)
    P, r = 4, 0.05
    B = orthonormal_rows(P, gen.latent_dim, seed=0, stream="B")
    per_call = brute_force_silu_flips(gen, z, B, r, monkeypatch)
    brute = sum(per_call)
    assert brute > 0

    remat = build_generator(vae_spec(pipe, dtype="float64", remat="full"), "float64")
    fn = lambda x: remat.apply(remat.params, x)  # noqa: E731
    sites = cx.trace_sites(fn, z)
    silu = [s.index for s in sites if s.name == "silu"]
    # decoder: conv_in, 2 mid resnets + 2 up blocks x 2 resnets, each with 2 SiLUs, and norm_out
    assert len(silu) == len(per_call) == 2 * (2 + 2 * 2) + 1
    # flax's GroupNorm clamps its variance with max(var, 0): a zero-clamp site, one per group,
    # inside a norm scope (select layers: [silu] to leave them out; they cannot flip anyway)
    assert all(s.name == "max" and "norm" in s.label for s in sites if s.name != "silu")
    total, per_site = jax.jit(lambda x: cx.local_complexity(fn, x, B, r))(z)
    assert int(total) == brute               # GroupNorm's max(var, 0) sites are counted too, never flip
    _, per_silu = jax.jit(lambda x: cx.local_complexity(fn, x, B, r, sites=silu))(z)
    assert [int(c) for c in per_silu] == per_call


# ------------------------------------------------------------------------------------------------
# (d) whole jobs
# ------------------------------------------------------------------------------------------------

def read_job(out):
    import pandas as pd

    df = pd.read_parquet(out).sort_values("sample_id").reset_index(drop=True)
    arts = np.load(out / "_artifacts" / "projections.npz")
    return df, arts["W"], arts["B"]


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_a_vae_decoder_job_gives_the_reference_records(pipe, tmp_path, monkeypatch, dtype):
    """Each record against the references at its own latent (sample i = default_rng([1, i])):
    psi and nu of W A(z) from the dense Jacobian (float32: to the float32 SVD's rounding; bf16:
    the bf16 slack derived in test_bfloat16_decoder_...), and for float32 delta equal to the
    brute-force count of SiLU sign changes at the job's own vertices."""
    from geomjobs import run_job
    spec = {"model": vae_spec(pipe, dtype=dtype),
            "latents": {"kind": "gaussian", "count": 6, "shape": [4, 4, 4], "seed": 1},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 8, "chunk": 4}, "local_rank": {},
                            "local_complexity": {"directions": 2, "radius": 0.05}},
            "execution": {"shard_size": 3, "batch_size": 3}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df, W, B = read_job(tmp_path / "out")
    assert list(df.sample_id) == list(range(6)) and (df.status == "ok").all()
    assert df.model_id.iloc[0].startswith("diffusers-vae:") and df.prompt_id.isna().all()
    assert W.shape == (8, 192) and B.shape == (2, 64)
    z = np.stack([np.random.default_rng([1, i]).standard_normal((4, 4, 4)) for i in range(6)])
    ref = record_psi_nu(build_generator(vae_spec(pipe)), z, W)        # the float32 decoder
    tol = {"float32": 1e-3, "bfloat16": 0.15}[dtype]
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=tol)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=tol)
    if dtype == "float32":
        gen = build_generator(vae_spec(pipe))
        brute = [sum(brute_force_silu_flips(gen, zi, B, 0.05, monkeypatch)) for zi in z]
        assert list(df.local_complexity) == brute and sum(brute) > 0


def test_a_unet_job_keeps_timestep_and_prompt_id(pipe, tmp_path):
    from geomjobs import run_job
    spec = {"model": unet_spec(pipe, prompt_index=2, prediction="x0"),
            "latents": {"kind": "gaussian", "count": 2, "shape": [4, 4, 4]},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4, "chunk": 4}, "local_rank": {}},
            "execution": {"shard_size": 2, "batch_size": 2}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df, W, _ = read_job(tmp_path / "out")
    assert list(df.timestep) == [400, 400] and list(df.prompt_id) == [2, 2] and df.cfg_scale.isna().all()
    z = np.stack([np.random.default_rng([0, i]).standard_normal((4, 4, 4)) for i in range(2)])
    ref = record_psi_nu(build_generator(unet_spec(pipe, prompt_index=2, prediction="x0")), z, W)
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=1e-3)


def test_a_unet_job_at_cfg_records_cfg_scale_and_takes_the_old_key_with_a_warning(pipe, tmp_path):
    """model.guidance_scale, the key's old name, still works (a FutureWarning names cfg_scale): the
    records carry cfg_scale = 3.0 (guidance_scale, the reward guidance's column, stays null: no
    generated latents) and psi is the CFG model's."""
    from geomjobs import run_job
    old = unet_spec(pipe, prompt_index=2, guidance_scale=3.0, negative_embedding_index=0)
    spec = {"model": old, "latents": {"kind": "gaussian", "count": 2, "shape": [4, 4, 4]},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4, "chunk": 4}},
            "execution": {"shard_size": 2, "batch_size": 2}}
    with pytest.warns(FutureWarning, match=r"'model.guidance_scale' is deprecated: use 'model.cfg_scale'"):
        res = run_job(spec, str(tmp_path / "out"))
    assert res.ok, res
    df, W, _ = read_job(tmp_path / "out")
    assert list(df.cfg_scale) == [3.0, 3.0] and df.guidance_scale.isna().all()
    new = build_generator(unet_spec(pipe, prompt_index=2, cfg_scale=3.0, negative_embedding_index=0))
    assert new.cfg_scale == 3.0
    z = np.stack([np.random.default_rng([0, i]).standard_normal((4, 4, 4)) for i in range(2)])
    np.testing.assert_allclose(df.local_scaling, record_psi_nu(new, z, W)[:, 0], rtol=0, atol=1e-3)


def test_a_remote_model_folder_is_copied_once_into_the_cache(pipe, tmp_path, monkeypatch):
    """gs:// goes through fsspec like any remote URI; memory:// exercises the same copy path."""
    import fsspec
    monkeypatch.setenv("GEOMJOBS_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    base = f"/geomjobs-test-{os.getpid()}"
    for sub in ("vae", "scheduler"):
        fs.put(str(pipe["root"] / sub), f"{base}/{sub}", recursive=True)
    try:
        spec = {"kind": VAE, "path": f"memory://{base}", "subfolder": "vae"}
        gen = build_generator(spec)
        entries = os.listdir(tmp_path / "cache")
        assert len(entries) == 1 and os.listdir(tmp_path / "cache" / entries[0] / "vae")
        assert not os.path.exists(tmp_path / "cache" / entries[0] / "scheduler")   # only what is needed
        ref = build_generator(vae_spec(pipe)).params
        jax.tree_util.tree_map(np.testing.assert_array_equal, gen.params, ref)
        build_generator(spec)
        assert os.listdir(tmp_path / "cache") == entries            # reused
        cfg = json.loads(fs.cat(f"{base}/vae/config.json"))
        fs.pipe(f"{base}/vae/config.json", json.dumps({**cfg, "scaling_factor": 0.5}).encode())
        build_generator(spec)
        assert len(os.listdir(tmp_path / "cache")) == 2            # a changed file is fetched again
        with pytest.raises(SpecError, match=r"model.subfolder'.*no subfolder 'unet'"):
            build_generator({**spec, "subfolder": "unet"})
        with pytest.raises(SpecError, match=r"model.path'.*does not exist"):
            build_generator({**spec, "path": "memory:///nowhere"})
    finally:
        fs.rm(base, recursive=True)


# ------------------------------------------------------------------------------------------------
# (e) spec problems name the key
# ------------------------------------------------------------------------------------------------

def job(model):
    return {"model": model, "latents": {"kind": "gaussian", "count": 1, "shape": [4, 4, 4]},
            "descriptors": {"local_scaling": {}}}


@pytest.mark.parametrize("case,msg", [
    (lambda p, t: vae_spec(p, subfolder="vea"), r"model.subfolder'.*no subfolder 'vea'"),
    (lambda p, t: vae_spec(p, subfolder="unet"), r"model.subfolder'.*is a UNet2DConditionModel folder; expected a folder of AutoencoderKL"),
    (lambda p, t: unet_spec(p, subfolder="vae"), r"model.subfolder'.*is a AutoencoderKL folder; expected a folder of UNet2DConditionModel"),
    (lambda p, t: {"kind": VAE, "path": str(p["root"])}, r"model.path'.*no config.json.*subfolder: vae"),
    (lambda p, t: {"kind": VAE, "path": str(t / "none")}, r"model.path'.*does not exist"),
    (lambda p, t: vae_spec(p, dtype="int8"), r"model.dtype'"),
    (lambda p, t: vae_spec(p, latent_shape=[3, 4, 4]), r"model.latent_shape'.*4 latent channels"),
    (lambda p, t: vae_spec(p, remat="some"), r"model.remat'"),
    (lambda p, t: unet_spec(p, prompt_index=3), r"model.prompt_index'.*0..2"),
    (lambda p, t: unet_spec(p, cfg_scale=1.0, negative_embedding_index=3), r"model.negative_embedding_index'.*0..2"),
    (lambda p, t: unet_spec(p, prompt_embeddings=str(t / "no.npz")), r"model.prompt_embeddings'.*does not exist"),
    (lambda p, t: unet_spec(p, timestep=1000), r"model.timestep'.*0..999"),
    (lambda p, t: unet_spec(p, path=str(t), subfolder="unet"), r"model.subfolder'"),
    (lambda p, t: unet_spec(p, scheduler_config={"beta_schedule": "cubic"}), r"model.scheduler_config'.*cubic"),
    (lambda p, t: unet_spec(p, scheduler_config={**SD_SCHEDULER, "prediction_type": "x"}), r"model.scheduler_config'.*'x'"),
])
def test_bad_paths_subfolders_and_values_name_the_key(pipe, tmp_path, case, msg):
    """What only the files can tell (folders, weights, indices into the prompt file, the
    scheduler's length) is checked by the builders."""
    with pytest.raises(SpecError, match=msg):
        build_generator(case(pipe, tmp_path))


@pytest.mark.parametrize("case,key", [
    (lambda p: vae_spec(p, dtype="int8"), "model.dtype"), (lambda p: {"kind": VAE}, "model.path"),
    (lambda p: vae_spec(p, subfolder=""), "model.subfolder"), (lambda p: vae_spec(p, remat="some"), "model.remat"),
    (lambda p: unet_spec(p, prediction="v"), "model.prediction"),
    (lambda p: {k: v for k, v in unet_spec(p).items() if k != "timestep"}, "model.timestep"),
    (lambda p: unet_spec(p, timestep=-1), "model.timestep"), (lambda p: unet_spec(p, timestep=1.5), "model.timestep"),
    (lambda p: {k: v for k, v in unet_spec(p).items() if k != "prompt_embeddings"}, "model.prompt_embeddings"),
    (lambda p: unet_spec(p, cfg_scale=5.0), "model.negative_embedding_index"),
    (lambda p: unet_spec(p, negative_embedding_index=0), "model.cfg_scale"),
    (lambda p: unet_spec(p, cfg_scale=2.0, guidance_scale=2.0, negative_embedding_index=0), "model.guidance_scale"),
    (lambda p: unet_spec(p, scheduler="x"), "model.scheduler"),
])
def test_the_job_schema_names_the_key_before_anything_is_loaded(pipe, case, key):
    with pytest.raises(SpecError) as e:
        validate_spec(job(case(pipe)))
    assert e.value.key == key, e.value


def test_folders_with_the_wrong_embeddings_or_only_pytorch_weights_are_refused(pipe, tmp_path):
    np.savez(tmp_path / "e.npz", embeddings=np.zeros((2, 5, 16), np.float32))
    with pytest.raises(SpecError, match=r"model.prompt_embeddings'.*dim 16.*cross_attention_dim is 8"):
        build_generator(unet_spec(pipe, prompt_embeddings=str(tmp_path / "e.npz")))
    np.savez(tmp_path / "f.npz", hidden=np.zeros((2, 5, 8), np.float32))
    with pytest.raises(SpecError, match=r"model.prompt_embeddings'.*no array 'embeddings'"):
        build_generator(unet_spec(pipe, prompt_embeddings=str(tmp_path / "f.npz")))
    pt = tmp_path / "pt" / "vae"
    pt.mkdir(parents=True)
    (pt / "config.json").write_text((pipe["root"] / "vae" / "config.json").read_text())
    (pt / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    # PyTorch safetensors are read without torch (tests/test_safetensors.py); an unreadable file is named
    with pytest.raises(SpecError, match=r"model.subfolder'.*diffusion_pytorch_model.safetensors' is not a readable safetensors"):
        build_generator({"kind": VAE, "path": str(tmp_path / "pt"), "subfolder": "vae"})


# ------------------------------------------------------------------------------------------------
# (e) latents from images through the diffusers VAE's encoder: the paper's reward-data recipe
# ------------------------------------------------------------------------------------------------

def test_images_encoded_by_the_diffusers_vae_are_its_scaled_posterior_means(pipe, tmp_path):
    from geomjobs.runner.plan import plan_job

    vae, params = pipe["vae"]
    folder, px = png_folder(tmp_path)
    enc = {"kind": "diffusers-vae", "path": str(pipe["root"]), "subfolder": "vae"}
    spec = {"model": vae_spec(pipe), "latents": {"kind": "images", "source": "folder", "uri": str(folder), "encoder": enc},
            "descriptors": {"local_scaling": {"mode": "exact"}}}
    plan = plan_job(spec)
    assert plan.count == 5 and plan.latents.shape == (4, 4, 4)
    z = plan.latents.latents(np.arange(5))
    # reference: diffusers' own encode of NCHW pixels in [-1, 1]; latent = mean * scaling_factor, channels first
    x = jnp.asarray(px / 255.0 * 2 - 1, jnp.float32).transpose(0, 3, 1, 2)
    mean = vae.apply({"params": params}, x, method=vae.encode).latent_dist.mean
    ref = np.transpose(np.asarray(mean), (0, 3, 1, 2)) * vae.config.scaling_factor
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    # so the decoder generator, G(z) = decode(z / scaling_factor), sees diffusers' own decode of the mean
    g = plan.generator
    np.testing.assert_allclose(jax.jit(g.apply)(g.params, jnp.asarray(z[0], jnp.float32)),
                               vae.apply({"params": params}, mean[:1], method=vae.decode).sample[0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow   # ~70 s; the UNet job (test_a_unet_job_keeps_timestep_and_prompt_id) and encode + diffuse
# (tests/test_image_latents.py, test_reward_train.py) stay in the default run
def test_a_job_encodes_diffuses_and_measures_the_unet(pipe, tmp_path, monkeypatch):
    """PNG images -> the VAE's encoder -> forward diffusion to t = 400 with SD's schedule -> psi, nu
    and delta of the UNet's x0 prediction at t = 400; records keep image id, t, noise seed, prompt
    id, and each record equals the references at its own latent."""
    from geomjobs import run_job
    from geomjobs.latents import build_latents
    folder, _ = png_folder(tmp_path, n=4)
    sched = {"kind": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    spec = {"model": unet_spec(pipe, prompt_index=1, prediction="x0"),
            "latents": {"kind": "images", "source": "folder", "uri": str(folder),
                        "encoder": {"kind": "diffusers-vae", "path": str(pipe["root"]), "subfolder": "vae"},
                        "diffuse": {"t": 400, "seed": 7, "schedule": sched}},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 16}, "local_rank": {},
                            "local_complexity": {"directions": 2, "radius": 1e-3, "layers": ["silu"]}},
            "execution": {"shard_size": 2, "batch_size": 2}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok and res.rows == 4, res
    df, W, B = read_job(tmp_path / "out")
    assert list(df.image_id) == [f"im{i}.png" for i in range(4)]
    assert (df.diffusion_t == 400).all() and (df.noise_seed == 7).all() and (df.prompt_id == 1).all()
    z = build_latents(validate_spec(spec)["latents"]).latents(np.arange(4))   # the encodings, diffused (checked above)
    gen = build_generator(spec["model"])
    ref = record_psi_nu(gen, z, W)
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=1e-3)
    brute = [sum(brute_force_silu_flips(gen, zi, B, 1e-3, monkeypatch)) for zi in z]
    assert list(df.local_complexity) == brute


@pytest.mark.parametrize("bad,key,msg", [
    ({"kind": "diffusers-vae"}, "latents.encoder.path", "is required"),
    ("enc:kind=taesd", "latents.encoder.kind", "expected 'diffusers-vae', got 'taesd'"),
    ("enc:path=nope", "latents.encoder.path", "does not exist"),
    ("enc:subfolder=unet", "latents.encoder.subfolder", "is a UNet2DConditionModel folder; expected a folder of AutoencoderKL"),
    ("enc:image_size=7", "latents.encoder.image_size", "multiple of 2"),
    ("enc:dtype=float16", "latents.encoder.dtype", "expected one of"),
    (5, "latents.encoder", "expected an encoder name"),
])
def test_a_bad_diffusers_encoder_names_its_key(pipe, tmp_path, bad, key, msg):
    from geomjobs.runner.plan import plan_job

    folder, _ = png_folder(tmp_path)
    enc = {"kind": "diffusers-vae", "path": str(pipe["root"]), "subfolder": "vae"}
    if isinstance(bad, str) and bad.startswith("enc:"):   # enc with one key changed
        k, v = bad[4:].split("=")
        bad = {**enc, k: int(v) if v.isdigit() else str(tmp_path / v) if k == "path" else v}
    spec = {"model": vae_spec(pipe), "latents": {"kind": "images", "source": "folder", "uri": str(folder), "encoder": bad},
            "descriptors": {"local_scaling": {}}}
    with pytest.raises(SpecError) as e:
        plan_job(spec)
    assert e.value.key == key and re.search(msg, str(e.value)), (bad, e.value)


def test_images_of_the_wrong_size_for_the_diffusers_encoder_are_named(pipe, tmp_path):
    from geomjobs.runner.plan import plan_job

    big, _ = png_folder(tmp_path, size=16)
    enc = {"kind": "diffusers-vae", "path": str(pipe["root"]), "subfolder": "vae"}
    with pytest.raises(SpecError, match=r"latents.uri'.*16x16 pixels, expected 8x8"):
        plan_job({"model": vae_spec(pipe), "latents": {"kind": "images", "source": "folder", "uri": str(big), "encoder": enc},
                  "descriptors": {"local_scaling": {}}})
