"""SDXL for ``diffusers-unet`` and ``diffusers-vae-decoder`` (geomjobs/generators/diffusers/sdxl.py):
the UNet's ``text_time`` added conditioning (pooled embeddings from a file, micro-conditions from
spec keys), the SDXL VAE's scaling factor, and SDXL-shaped PyTorch folders. Nothing is downloaded
and torch is not installed: tiny random-weight SDXL-shaped models (text_time, two transformer
layers in a block, linear projections, a DownBlock2D first as in SDXL) are written as
diffusers-format PyTorch folders by the real writer and read by the real loader.

What each check rests on:

- **keys and layouts**: every written tensor, through diffusers' own PyTorch -> Flax rules
  (``rename_key``, ``rename_key_and_reshape_tensor``), lands bit for bit on the Flax param it came
  from (as tests/test_safetensors.py checks for SD); every key component is an attribute of the
  PyTorch modules' source (``add_embedding`` included) and the written config.json has exactly
  the PyTorch class's ``__init__`` keys.
- **the UNet's output**: G(z) of the generator built from the PyTorch folder equals diffusers'
  Flax UNet called directly on the original weights with ``added_cond_kwargs`` assembled here by
  hand (time_ids = original size + crop + target size, in pixels, as the SDXL pipelines build
  them), guided by hand; the micro-conditions change the output (they enter).
- **the jobs**: psi of a job at a latent equals psi from the dense Jacobian (jacfwd) of the
  generator (UNet and decoder); a sampled-latents job with per-sample prompts conditions each
  sample on its own pooled row (it equals the single-prompt job of that prompt).
- **the micro-conditions' defaults** (test_time_ids_...): the SDXL pipelines' own (original and
  target size = the image's pixels, crop [0, 0]; refiner aesthetic scores 6.0 / 2.5) for the base
  and refiner configs of the published checkpoints (their widths: 2816 = 1280 + 6 x 256, 2560 =
  1280 + 5 x 256).
- **the cluster spec** (cluster/jobs/sdxl-sampled-decoder-psi.yaml): planned on the tiny pipeline.
- **bad input**: each refused before any work, naming the key.
"""
import json
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.generators.diffusers import pytorch_weights as ptw  # noqa: E402
from geomjobs.generators.diffusers import sdxl, write_pytorch_folder  # noqa: E402

from diffusers_tiny import SD_SCHEDULER, quiet, record_psi_nu, tiny_unet, tiny_vae  # noqa: E402

SEQ_DIMS = (6, 10)     # the two text encoders' widths (SDXL: 768, 1280), concatenated: cross_attention_dim 16
POOLED = 12            # text encoder 2's projected pooled width (SDXL: 1280)
TIME_DIM = 8           # addition_time_embed_dim (SDXL: 256)
SDXL_UNET = dict(sample_size=4, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(1, 2), transformer_layers_per_block=(1, 2), use_linear_projection=True,
                 cross_attention_dim=sum(SEQ_DIMS), addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
                 projection_class_embeddings_input_dim=POOLED + 6 * TIME_DIM)
SDXL_SCALE = 0.13025   # the SDXL VAE's scaling_factor (SD 1.x: 0.18215)


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    """A PyTorch SDXL-shaped pipeline folder (unet, vae, scheduler, prompt files) and the Flax
    modules and params it was written from; also an SD-style UNet folder (no text_time)."""
    quiet()
    root = tmp_path_factory.mktemp("sdxl")
    unet, up = tiny_unet(seed=3, **SDXL_UNET)
    vae, vp = tiny_vae(seed=4, scaling_factor=SDXL_SCALE)
    write_pytorch_folder(up, unet.config, root / "unet")
    write_pytorch_folder(vp, vae.config, root / "vae")
    sd, sp = tiny_unet(seed=5)
    write_pytorch_folder(sp, sd.config, root / "sd_unet")
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER))
    rng = np.random.default_rng(0)
    seq = np.concatenate([rng.standard_normal((3, 5, d)) for d in SEQ_DIMS], axis=-1).astype(np.float32)
    pooled = rng.standard_normal((3, POOLED)).astype(np.float32)
    seq[0], pooled[0] = 0.0, 0.0        # row 0: SDXL's zeroed negative prompt
    np.savez(root / "prompts.npz", embeddings=seq)
    np.savez(root / "pooled.npz", embeddings=pooled)
    return {"root": root, "unet": (unet, up), "vae": (vae, vp), "seq": seq, "pooled": pooled}


def unet_spec(xl, **kw):
    root = xl["root"]
    return {"kind": "diffusers-unet", "path": str(root), "subfolder": "unet", "timestep": 300,
            "prompt_embeddings": str(root / "prompts.npz"), "pooled_embeddings": str(root / "pooled.npz"), **kw}


def vae_spec(xl, **kw):
    return {"kind": "diffusers-vae-decoder", "path": str(xl["root"]), "subfolder": "vae", **kw}


def flat(tree):
    from flax.traverse_util import flatten_dict
    return flatten_dict(ptw._plain(tree))


def test_sdxl_keys_are_diffusers_own_conversion_and_the_pytorch_source(xl):
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor
    from test_safetensors import pytorch_source

    unet, params = xl["unet"]
    shapes = flat(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)))
    state = load_file(xl["root"] / "unet" / ptw.PT_WEIGHTS)
    ref, reached = flat(params), set()
    for k, t in state.items():
        fk, ft = rename_key_and_reshape_tensor(tuple(rename_key(k).split(".")), t, shapes)
        assert fk in shapes and fk not in reached, (k, fk)
        reached.add(fk)
        np.testing.assert_array_equal(ft, ref[fk], err_msg=k)
    assert reached == set(shapes)
    # SDXL's parts: the added embedding (pooled + 6 micro-conditions -> 4 x 32), the second
    # transformer layer, linear (not 1x1 conv) projections, cross-attention to the 16-d sequence
    assert state["add_embedding.linear_1.weight"].shape == (128, POOLED + 6 * TIME_DIM)
    assert state["add_embedding.linear_2.weight"].shape == (128, 128)
    blk = "down_blocks.1.attentions.0"
    assert state[f"{blk}.proj_in.weight"].shape == (64, 64)
    assert state[f"{blk}.transformer_blocks.1.attn2.to_k.weight"].shape == (64, 16)
    assert "mid_block.attentions.0.transformer_blocks.1.ff.net.2.weight" in state
    attrs, lists, inits = pytorch_source()
    for k in state:
        parts = k.split(".")
        for i, c in enumerate(parts[:-1]):
            assert (parts[i - 1] in lists) if c.isdigit() else (c in attrs), (k, c)
    cfg = json.loads((xl["root"] / "unet" / "config.json").read_text())
    assert set(cfg) - {"_class_name", "_diffusers_version"} == set(inits["UNet2DConditionModel"])
    assert cfg["addition_embed_type"] == "text_time" and cfg["transformer_layers_per_block"] == [1, 2]


@pytest.fixture(scope="module")
def reference(xl):
    """out(z, row, time_ids): diffusers' Flax UNet on the original params, called directly on one
    prompt row with ``added_cond_kwargs`` built here (one jitted program for every row)."""
    unet, params = xl["unet"]
    f = jax.jit(lambda z, seq, pooled, ids: unet.apply({"params": params}, z[None], 300, seq[None],
                                                        {"text_embeds": pooled[None], "time_ids": ids[None]}).sample[0])

    def out(z, row, ids):
        return np.asarray(f(jnp.asarray(z, jnp.float32), jnp.asarray(xl["seq"][row]), jnp.asarray(xl["pooled"][row]),
                            jnp.asarray(ids, jnp.float32)), np.float64)
    return out


def test_g_of_z_is_the_flax_unet_with_the_added_conditioning(xl, reference):
    """G of the generator built from the PyTorch folder: its UNet params are the original ones
    bitwise, its time_ids the pipeline's (pixels: 8 x the latent), and G(z) is the directly called
    UNet, guided by hand (out(negative) + s (out(prompt) - out(negative)), each row on its own, so
    to float32 rounding: the generator runs both rows in one batch)."""
    z = np.random.default_rng(1).standard_normal((4, 4, 4)).astype(np.float32)
    gen = build_generator(unet_spec(xl, prompt_index=2, cfg_scale=2.0, negative_embedding_index=0))
    jax.tree_util.tree_map(np.testing.assert_array_equal, flat(gen.params["unet"]), flat(xl["unet"][1]))
    default = [32, 32, 0, 0, 32, 32]            # a 4 x 4 latent is 32 x 32 pixels
    np.testing.assert_array_equal(gen.params["time_ids"], [default, default])
    np.testing.assert_array_equal(gen.params["text_embeds"], xl["pooled"][[0, 2]])
    neg, pos = reference(z, 0, default), reference(z, 2, default)
    ref = neg + 2.0 * (pos - neg)
    np.testing.assert_allclose(jax.jit(gen.apply)(gen.params, jnp.asarray(z)), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # explicit micro-conditions reach the UNet, and change its output
    sizes = dict(original_size=[64, 48], crops_coords_top_left=[4, 2], target_size=[40, 40])
    other = build_generator(unet_spec(xl, prompt_index=1, **sizes))
    ref1 = reference(z, 1, [64, 48, 4, 2, 40, 40])
    out1 = np.asarray(jax.jit(other.apply)(other.params, jnp.asarray(z)))
    np.testing.assert_allclose(out1, ref1, rtol=1e-5, atol=1e-5 * np.abs(ref1).max())
    assert np.abs(ref1 - reference(z, 1, default)).max() > 1e-2


def test_memory_efficient_attention_is_the_same_function(xl):
    """model.memory_efficient_attention: diffusers' chunked attention in the UNet (what makes the
    SDXL UNet's psi plan fit 80 GB, BENCHMARKS.md): G(z) equal to the plain attention's to float32 rounding."""
    z = jnp.asarray(np.random.default_rng(4).standard_normal((4, 4, 4)), jnp.float32)
    a = build_generator(unet_spec(xl, prompt_index=1))
    b = build_generator(unet_spec(xl, prompt_index=1, memory_efficient_attention=True))
    ref = np.asarray(jax.jit(a.apply)(a.params, z))
    np.testing.assert_allclose(jax.jit(b.apply)(b.params, z), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # another program (the chunked attention's loop), not the same one twice
    assert "scan" in str(jax.make_jaxpr(b.apply)(b.params, z)) and "scan" not in str(jax.make_jaxpr(a.apply)(a.params, z))


def test_time_ids_of_base_and_refiner_configs():
    base = SimpleNamespace(addition_time_embed_dim=256, cross_attention_dim=2048, projection_class_embeddings_input_dim=2816)
    refiner = SimpleNamespace(addition_time_embed_dim=256, cross_attention_dim=1280, projection_class_embeddings_input_dim=2560)
    assert (sdxl.micro_conditions(base), sdxl.pooled_width(base)) == (6, 1280)
    assert (sdxl.micro_conditions(refiner), sdxl.pooled_width(refiner)) == (5, 1280)
    np.testing.assert_array_equal(sdxl.time_ids({}, base, (4, 128, 128)), [[1024, 1024, 0, 0, 1024, 1024]])
    np.testing.assert_array_equal(sdxl.time_ids({"aesthetic_score": 7.0}, refiner, (4, 96, 128), negative=True),
                                  [[768, 1024, 0, 0, 2.5], [768, 1024, 0, 0, 7.0]])
    with pytest.raises(SpecError, match=r"model.target_size'.*refiner"):
        sdxl.time_ids({"target_size": [1024, 1024]}, refiner, (4, 128, 128))
    with pytest.raises(SpecError, match=r"model.aesthetic_score'.*refiner"):
        sdxl.time_ids({"aesthetic_score": 6.0}, base, (4, 128, 128))


def test_the_sdxl_vae_decoder_and_encoder_use_its_scaling_factor(xl):
    from geomjobs.generators.encoders import get_encoder

    vae, params = xl["vae"]
    gen = build_generator(vae_spec(xl))
    z = np.random.default_rng(2).standard_normal((4, 4, 4)).astype(np.float32)
    ref = vae.apply({"params": params}, jnp.asarray(z.transpose(1, 2, 0)[None] / SDXL_SCALE), method=vae.decode).sample[0]
    np.testing.assert_allclose(jax.jit(gen.apply)(gen.params, jnp.asarray(z)), ref, rtol=1e-5, atol=1e-5)
    enc = get_encoder({"kind": "diffusers-vae", "path": str(xl["root"]), "subfolder": "vae"})
    px = np.random.default_rng(3).uniform(size=(8, 8, 3)).astype(np.float32)
    mean = vae.apply({"params": params}, jnp.asarray(2 * px.transpose(2, 0, 1)[None] - 1), method=vae.encode).latent_dist.mean
    np.testing.assert_allclose(jax.jit(enc.apply)(enc.params, jnp.asarray(px)), np.transpose(mean[0], (2, 0, 1)) * SDXL_SCALE,
                               rtol=1e-5, atol=1e-6)


def run(spec, out):
    import pandas as pd

    from geomjobs import run_job
    res = run_job(spec, str(out))
    assert res.ok, res
    df = pd.read_parquet(out).sort_values("sample_id").reset_index(drop=True)
    assert (df.status == "ok").all()
    return df, np.load(out / "_artifacts" / "projections.npz")["W"]


# the UNet's job takes ~30-60 s here (make test-slow): G(z) above decides what it computes, and the
# sampled job below runs the SDXL UNet end to end in the default run
@pytest.mark.parametrize("kind", [pytest.param("unet", marks=pytest.mark.slow), "vae"])
def test_psi_of_a_job_at_a_latent_on_the_sdxl_models(xl, tmp_path, kind):
    """psi and nu of one record (k = 4 projections) against the dense Jacobian's at the job's latent."""
    model = unet_spec(xl, prompt_index=2, cfg_scale=3.0, negative_embedding_index=0) if kind == "unet" else vae_spec(xl)
    spec = {"model": model, "latents": {"kind": "gaussian", "count": 1, "shape": [4, 4, 4], "seed": 7},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4, "chunk": 4}, "local_rank": {}},
            "execution": {"shard_size": 1, "batch_size": 1}}
    df, W = run(spec, tmp_path / "out")
    z = np.random.default_rng([7, 0]).standard_normal((1, 4, 4, 4))
    ref = record_psi_nu(build_generator(model), z, W)
    np.testing.assert_allclose(df.local_scaling, ref[:, 0], rtol=0, atol=1e-3)
    np.testing.assert_allclose(df.local_rank, ref[:, 1], rtol=0, atol=1e-3)
    assert np.isfinite(ref).all()
    if kind == "unet":
        assert list(df.prompt_id) == [2] and list(df.cfg_scale) == [3.0]


def test_sampled_sdxl_latents_take_each_prompts_pooled_row(xl, tmp_path):
    """Decoder psi at latents the SDXL UNet samples (the cluster spec's shape, tiny): with
    per-sample prompts (rows 1, 2) sample 1 is the single-prompt job's sample 0 for row 2, so it
    was conditioned on row 2's pooled embedding as well as its sequence."""
    def job(out, **lat):
        spec = {"model": vae_spec(xl), "descriptors": {"local_scaling": {"mode": "projection", "k": 3, "chunk": 3}},
                "latents": {"kind": "sampled", "count": 2, "seed": 5, "save_latent": True, "batch_size": 2,
                            "sampler": {"kind": "ddim", "steps": 2}, **lat},
                "execution": {"shard_size": 2, "batch_size": 2}}
        return run(spec, tmp_path / out)[0]
    sweep = job("sweep", model=unet_spec(xl, prompt_index=1), prompts={"seeds_per_prompt": 1})
    single = job("single", model=unet_spec(xl, prompt_index=2), count=1)
    assert list(sweep.prompt_id) == [1, 2]
    np.testing.assert_allclose(np.stack(sweep.z)[1], np.stack(single.z)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sweep.local_scaling[1], single.local_scaling[0], rtol=1e-4, atol=1e-4)
    # the pooled row matters: row 1's sample from the same noise differs
    assert np.abs(np.stack(sweep.z)[0] - np.stack(single.z)[0]).max() > 1e-3


def bad_files(root):
    rng = np.random.default_rng(9)
    np.savez(root / "pooled_narrow.npz", embeddings=rng.standard_normal((3, 10)).astype(np.float32))
    np.savez(root / "pooled_two.npz", embeddings=rng.standard_normal((2, POOLED)).astype(np.float32))
    np.savez(root / "pooled_3d.npz", embeddings=rng.standard_normal((3, 1, POOLED)).astype(np.float32))
    np.savez(root / "seq_narrow.npz", embeddings=rng.standard_normal((3, 5, 8)).astype(np.float32))


BAD = [
    (dict(pooled_embeddings=None), "model.pooled_embeddings", "addition_embed_type 'text_time'.*num_prompts, 12"),
    (dict(pooled_embeddings="pooled_narrow.npz"), "model.pooled_embeddings", "dim 10; the UNet takes 12"),
    (dict(pooled_embeddings="pooled_two.npz"), "model.pooled_embeddings", "2 pooled rows; prompt_embeddings has 3"),
    (dict(pooled_embeddings="pooled_3d.npz"), "model.pooled_embeddings", r"shape \(num_prompts, dim\)"),
    (dict(pooled_embeddings="absent.npz"), "model.pooled_embeddings", "does not exist"),
    (dict(prompt_embeddings="seq_narrow.npz"), "model.prompt_embeddings", "dim 8.*cross_attention_dim is 16"),
    (dict(aesthetic_score=6.0), "model.aesthetic_score", "refiner"),
    (dict(subfolder="sd_unet", prompt_embeddings="seq_narrow.npz"), "model.pooled_embeddings",
     "addition_embed_type None.*takes no pooled_embeddings"),
    (dict(subfolder="sd_unet", pooled_embeddings=None, prompt_embeddings="seq_narrow.npz", target_size=[8, 8]),
     "model.target_size", "takes no target_size"),
]


@pytest.mark.parametrize("change,key,msg", BAD)
def test_bad_sdxl_inputs_name_the_key(xl, change, key, msg):
    root = xl["root"]
    if not (root / "pooled_narrow.npz").exists():
        bad_files(root)
    spec = unet_spec(xl)
    for k, v in change.items():
        if v is None:
            spec.pop(k)
        else:
            spec[k] = str(root / v) if str(v).endswith(".npz") else v
    with pytest.raises(SpecError) as e:
        build_generator(spec)
    assert e.value.key == key, e.value
    assert re.search(msg, e.value.message), e.value.message


def test_pooled_embeddings_from_parquet_and_their_prompt_ids(xl, tmp_path):
    """A Parquet pooled file (a list of floats per row) loads the .npz's rows; its own prompt_id
    column must equal the prompt file's (an .npz: the row numbers)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [r.tolist() for r in xl["pooled"]]
    pq.write_table(pa.table({"embedding": rows}), tmp_path / "p.parquet")
    gen = build_generator(unet_spec(xl, prompt_index=2, pooled_embeddings=str(tmp_path / "p.parquet")))
    np.testing.assert_array_equal(gen.params["text_embeds"], xl["pooled"][[2]])
    pq.write_table(pa.table({"embedding": rows, "prompt_id": [5, 6, 7]}), tmp_path / "q.parquet")
    with pytest.raises(SpecError, match=r"model.pooled_embeddings'.*row 0 has prompt_id 5; prompt_embeddings' row 0 has 0"):
        build_generator(unet_spec(xl, pooled_embeddings=str(tmp_path / "q.parquet")))


def test_the_command_line_exits_2_naming_the_key(xl, tmp_path, capsys):
    import yaml

    from geomjobs.cli import main
    for model, key in ((unet_spec(xl, original_size=[0, 1024]), "model.original_size"),
                       ({k: v for k, v in unet_spec(xl).items() if k != "pooled_embeddings"}, "model.pooled_embeddings")):
        spec = {"model": model, "latents": {"kind": "gaussian", "count": 1, "shape": [4, 4, 4]}, "descriptors": {"local_scaling": {}}}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        capsys.readouterr()
        assert main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert key in err, err
        assert not (tmp_path / "out").exists()


def test_the_cluster_spec_plans_on_the_tiny_pipeline(xl, tmp_path):
    """cluster/jobs/sdxl-sampled-decoder-psi.yaml with its folder and files swapped for the tiny
    ones (and count, k, the negative row shrunk to their sizes): every key is read by the planner,
    the sampler's UNet carries the spec's micro-conditions and both rows' pooled embeddings."""
    from pathlib import Path

    import yaml

    from geomjobs.runner.plan import plan_job

    root = xl["root"]
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "jobs" / "sdxl-sampled-decoder-psi.yaml").read_text())
    unet = spec["latents"]["model"]
    assert spec["model"]["path"] == unet["path"] and unet["path"].endswith("stable-diffusion-xl-base-1.0")
    assert (unet["negative_embedding_index"], unet["original_size"]) == (1000, [1024, 1024])
    spec["model"]["path"] = unet["path"] = str(root)
    unet.update(prompt_embeddings=str(root / "prompts.npz"), pooled_embeddings=str(root / "pooled.npz"), prompt_index=1,
                negative_embedding_index=0)
    spec["latents"].update(count=8)           # rows 1, 2 x 4 seeds
    spec["descriptors"]["local_scaling"]["k"] = 8
    spec["output"] = str(tmp_path / "out")
    plan = plan_job(spec)
    assert plan.generator.latent_shape == (4, 4, 4) and plan.count == 8
    gen = plan.latents.run.gen
    assert gen.cfg_scale == 5.0
    np.testing.assert_array_equal(gen.params["time_ids"], [[1024, 1024, 0, 0, 1024, 1024]] * 2)
    np.testing.assert_array_equal(gen.params["text_embeds"], jnp.asarray(xl["pooled"][[0, 1]], jnp.bfloat16))   # dtype: bfloat16
