"""Tiny random-weight diffusers (Flax) models for tests: built from configs, written with the real
``save_pretrained`` into a pipeline-shaped folder, so the generators load them through the real
``from_pretrained``. Nothing is downloaded.

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
import numpy as np

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


def random_params(module, seed: int = 0):
    """Random float32 params for a diffusers Flax module, in the layout its ``init_weights`` gives.

    Shapes come from ``jax.eval_shape(module.init_weights, key)`` (no FLOPs: running flax's
    initialisers eagerly takes ~40 s for the tiny UNet on two cores). Kernels (..., fan_in, out)
    get N(0, 1/fan_in), biases N(0, 0.1^2), norm scales 1 + N(0, 0.1^2): every unit is generic
    (diffusers' own init zeroes the UNet's output conv, which would make eps identically 0).
    """
    shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        if name == "scale":
            return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def tiny_vae(seed: int = 0, **overrides):
    """(module, params) of a random FlaxAutoencoderKL (float32 params)."""
    from diffusers import FlaxAutoencoderKL
    quiet()
    vae = FlaxAutoencoderKL(**{**TINY_VAE, **overrides})
    return vae, random_params(vae, seed)


def tiny_unet(seed: int = 0, **overrides):
    """(module, params) of a random FlaxUNet2DConditionModel (float32 params)."""
    from diffusers import FlaxUNet2DConditionModel
    quiet()
    unet = FlaxUNet2DConditionModel(**{**TINY_UNET, **overrides})
    return unet, random_params(unet, seed)


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
