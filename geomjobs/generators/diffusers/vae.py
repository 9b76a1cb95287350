"""``kind: diffusers-vae-decoder``: G(z) = vae.decode(z / scaling_factor + shift_factor).sample[0].

The raw decoder output (3, H, W), ``scaling_factor`` (and ``shift_factor``, SD3-style VAEs only)
from the VAE's config. ``FlaxAutoencoderKL.decode`` in diffusers 0.39 takes NCHW *or* NHWC and
guesses which by testing ``latents.shape[-1] != latent_channels``: an NCHW latent whose width
equals the channel count (4 x 4 x 4, say) is silently read as NHWC. We always hand it NHWC, so it
never transposes, and it returns NCHW. Latents are channels-first ``(C, h, w)``.
"""
from __future__ import annotations

import jax.numpy as jnp

import geomjobs.generators.diffusers.folders as folders
from geomjobs.generators.base import Generator
from geomjobs.generators.diffusers.folders import Numerics


def vae_decoder_generator(model: dict, dtype=jnp.float32) -> Generator:
    """``kind: diffusers-vae-decoder`` (keys: path, subfolder, dtype, latent_shape, model_id, remat)."""
    diffusers = folders.import_diffusers("diffusers-vae-decoder")
    numerics = Numerics(folders.compute_dtype(model), dtype, model.get("remat", "none"))
    folder = folders.model_folder(model, "AutoencoderKL", "vae")
    vae, params, raw = folders.load_pretrained(diffusers.FlaxAutoencoderKL, folder, numerics.compute)
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    side = cfg.sample_size // down
    shape = folders.latent_shape(model, (cfg.latent_channels, side, side), cfg.latent_channels)
    shift = raw.get("shift_factor")
    factors = (float(raw.get("scaling_factor", cfg.scaling_factor)), 0.0 if shift is None else float(shift))
    return vae_decoder_from_module(vae, params, shape, numerics, factors, folders.default_model_id(model, "diffusers-vae"))


def vae_decoder_from_module(vae, params, latent_shape, numerics: Numerics = Numerics(), factors=None,
                            model_id: str = "diffusers-vae") -> Generator:
    """The decoder generator of an in-memory FlaxAutoencoderKL ``vae`` and its params (the full
    tree or just ``post_quant_conv`` + ``decoder``): what ``kind: diffusers-vae-decoder`` builds
    after loading, also used by benchmarks/bench_sd.py on random SD-shaped weights.
    ``factors``: (scaling_factor, shift_factor), default (the config's scaling_factor, 0)."""
    compute = numerics.compute
    # only the decoder half: the encoder's weights never enter G
    params = folders.cast_params({k: params[k] for k in ("post_quant_conv", "decoder")}, compute)
    scale, shift = (float(vae.config.scaling_factor), 0.0) if factors is None else (float(factors[0]), float(factors[1]))
    out_dtype = numerics.out

    def decode(p, z):
        x = jnp.transpose(z / scale + shift, (1, 2, 0))[None].astype(compute)   # (1, h, w, C): NHWC
        return vae.apply({"params": p}, x, method=vae.decode).sample[0].astype(out_dtype)   # (3, H, W)

    apply = folders.with_remat(decode, numerics.remat)
    shape = tuple(latent_shape)
    return Generator(model_id=model_id, apply=apply, params=params, latent_shape=shape,
                     output_shape=folders.shape_of(apply, params, shape, numerics.dtype), dtype=numerics.dtype)
