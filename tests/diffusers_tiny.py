"""Tiny random-weight diffusers (Flax) models for tests: built from configs, written with the real
``save_pretrained`` into a pipeline-shaped folder, so the generators load them through the real
``from_pretrained``. Nothing is downloaded. Random weights: kernels N(0, 1/fan_in), biases
N(0, 0.1^2), norm scales 1 + N(0, 0.1^2) (geomjobs.generators.diffusers.random_weights), so every
unit is generic. Also the references the diffusers tests share: the dense Jacobian (checked
against central differences), psi / nu of a job's records from it, and a brute-force count of
the SiLU inputs that change sign.

Layout written by :func:`write_pipeline` (what a diffusers pipeline folder looks like)::

    root/vae/{config.json, diffusion_flax_model.msgpack}
    root/unet/{config.json, diffusion_flax_model.msgpack}
    root/scheduler/scheduler_config.json
    root/prompts.npz            # embeddings: (num_prompts, seq, cross_attention_dim)
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.generators.diffusers import module_random_params

from references import flips, psi_nu

# 4 x 4 x 4 latents -> 3 x 8 x 8 images (d = 64, n = 192); SiLU + GroupNorm + a mid-block attention
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                latent_channels=4, norm_num_groups=4, sample_size=8)
# diffusers' Flax UNet blocks hard-code GroupNorm(32 groups): channels must be multiples of 32.
# 4 x 4 x 4 latents -> 4 x 4 x 4 (d = n = 64): one cross-attention block down, the mid block
# (resnet, cross-attention, resnet), one up; cross-attention to (seq, 8) prompt embeddings
TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 attention_head_dim=2, cross_attention_dim=8)
# SD 1.x's schedule (scaled_linear, 1000 steps)
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "epsilon"}


def quiet():
    """diffusers logs a deprecation warning for every Flax module it sets up."""
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")


def tiny_vae(seed: int = 0, **overrides):
    """(module, params) of a random FlaxAutoencoderKL (float32 params)."""
    from diffusers import FlaxAutoencoderKL
    quiet()
    vae = FlaxAutoencoderKL(**{**TINY_VAE, **overrides})
    return vae, module_random_params(vae, seed)


def tiny_unet(seed: int = 0, **overrides):
    """(module, params) of a random FlaxUNet2DConditionModel (float32 params)."""
    from diffusers import FlaxUNet2DConditionModel
    quiet()
    unet = FlaxUNet2DConditionModel(**{**TINY_UNET, **overrides})
    return unet, module_random_params(unet, seed)


def write_prompts(path, num_prompts: int = 3, seq: int = 5, dim: int = 8, seed: int = 0) -> np.ndarray:
    emb = np.random.default_rng(seed).standard_normal((num_prompts, seq, dim)).astype(np.float32)
    np.savez(path, embeddings=emb)
    return emb


def write_pipeline(root, *, vae: bool = True, unet: bool = True, scheduler: dict | None = SD_SCHEDULER) -> dict:
    """Write a pipeline-shaped folder at ``root``; returns the modules, params and embeddings."""
    root = Path(root)
    out: dict = {"root": root}
    if vae:
        m, p = tiny_vae()
        m.save_pretrained(root / "vae", params=p)
        out["vae"] = (m, p)
    if unet:
        m, p = tiny_unet()
        m.save_pretrained(root / "unet", params=p)
        out["unet"] = (m, p)
        out["prompts"] = write_prompts(root / "prompts.npz", dim=TINY_UNET["cross_attention_dim"])
    if scheduler is not None:
        (root / "scheduler").mkdir(parents=True, exist_ok=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    return out


def png_folder(tmp_path, n=5, size=8, seed=0):
    """n random RGB PNGs (size x size) in tmp_path/imgs; returns the folder and the uint8 pixels."""
    from PIL import Image

    px = np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    folder = tmp_path / "imgs"
    folder.mkdir(exist_ok=True)
    for i, p in enumerate(px):
        Image.fromarray(p).save(folder / f"im{i}.png")
    return folder, px


# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------

def dense_reference(gen, z):
    """Jacobian of the generator at flat z by jacfwd (in z's dtype), checked against central
    differences on 16 columns (enough to catch a wrong path) when z is float64."""
    g = gen.flat_fn()
    if z.dtype != jnp.float64:
        return np.asarray(jax.jit(jax.jacfwd(g))(z), np.float64)
    h, step = 1e-6, max(1, len(z) // 16)
    e = jnp.eye(len(z), dtype=z.dtype)[::step] * h
    a, plus, minus = jax.jit(lambda x: (jax.jacfwd(g)(x), jax.vmap(g)(x + e), jax.vmap(g)(x - e)))(z)
    a = np.asarray(a)
    fd = (np.asarray(plus) - np.asarray(minus)).T / (2 * h)
    np.testing.assert_allclose(a[:, ::step], fd, rtol=1e-6, atol=1e-7 * np.abs(a).max())
    return a


def record_psi_nu(gen, latents, w):
    """(psi, nu) per latent of SPEC mode projection, W A(z) from the dense Jacobian at z in the
    generator's dtype, the SVD in float64 (the job's own SVD is float32: compare with float32 slack)."""
    out = []
    for z in latents:
        a = dense_reference(gen, jnp.asarray(np.reshape(z, -1), gen.dtype))
        out.append(psi_nu(w @ a)[:2])
    return np.array(out)


def silu_inputs(gen, monkeypatch):
    """fn z -> inputs of every SiLU the diffusers modules call (their nn.swish / nn.silu are looked
    up on flax.linen at call time, so patching the attribute records them)."""
    import flax.linen as nn

    rec = []

    def recording(x):
        rec.append(x)
        return jax.nn.silu(x)

    def taps(z):
        rec.clear()
        with monkeypatch.context() as m:
            m.setattr(nn, "swish", recording)
            m.setattr(nn, "silu", recording)
            gen.apply(gen.params, z)
        return list(rec)

    return taps


def brute_force_silu_flips(gen, z, B, r, monkeypatch) -> list[int]:
    """Per SiLU call: the number of its inputs whose sign is not the same at all 2P vertices z +- r b_i."""
    flat = np.asarray(z, np.float64).reshape(-1)
    verts = np.concatenate([flat + r * B, flat - r * B]).reshape(2 * len(B), *gen.latent_shape)
    taps = jax.jit(jax.vmap(silu_inputs(gen, monkeypatch)))(jnp.asarray(verts, gen.dtype))
    return [flips(np.asarray(t)) for t in taps]
