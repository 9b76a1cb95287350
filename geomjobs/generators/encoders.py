"""Image encoders for ``latents: {kind: images, encoder: ...}``, found by kind in :data:`ENCODERS`.

The spec's ``encoder`` is a name (``vae-digits``) or a mapping with a ``kind``
(``{kind: diffusers-vae, path, subfolder, dtype, image_size}``); either way the builder gets the
mapping (a name ``n`` is ``{kind: n}``) and returns an :class:`ImageEncoder`.

- ``vae-digits``: the zoo beta-VAE's encoder mean, image (8, 8) in [0, 1] -> (8,).
- ``diffusers-vae``: the VAE's posterior mean of an (H, W, C) image in [0, 1] (PNG pixels / 255),
  as the latent the decoder and the UNet take: z = (mean - shift_factor) * scaling_factor,
  channels first, the inverse of ``diffusers-vae-decoder``'s G(z) = decode(z / scaling_factor +
  shift_factor). The image enters the encoder as 2 x - 1 (diffusers' [-1, 1] convention), NCHW
  (what ``FlaxAutoencoderKL.encode`` takes). Only the encoder half of the weights is kept.
"""
from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from geomjobs.errors import SpecError
from geomjobs.generators.base import ImageEncoder
from geomjobs.generators.diffusers.folders import (
    cast_params,
    compute_dtype,
    default_model_id,
    import_diffusers,
    load_pretrained,
    model_folder,
)
from geomjobs.generators.vae import BetaVAE, encoder_params, load_vae, vae_model_id

KEY = "latents.encoder"


def vae_digits_encoder(enc: dict | None = None, name="vae-digits") -> ImageEncoder:
    """The zoo VAE's encoder mean, one image ``image_shape`` -> mu (latent_dim,) (float32).
    ``name``: a zoo name or a path to a .npz/.json pair."""
    module, params, _ = load_vae(name)

    def apply(p, x):
        return module.apply(p, x, method=BetaVAE.encode)[0]

    return ImageEncoder(model_id=vae_model_id(name), apply=apply, params=encoder_params(params),
                        image_shape=tuple(module.image_shape), latent_shape=(module.latent_dim,))


def diffusers_vae_encoder(enc: dict) -> ImageEncoder:
    """``{kind: diffusers-vae, path, subfolder, dtype, image_size, model_id}`` (module doc)."""
    diffusers = import_diffusers("latents.encoder kind diffusers-vae")
    if "path" not in enc:
        raise SpecError(f"{KEY}.path", "is required for encoder kind 'diffusers-vae'")
    try:
        compute = compute_dtype(enc)
        vae, params, raw = load_pretrained(diffusers.FlaxAutoencoderKL, model_folder(enc, "AutoencoderKL", "vae"), compute)
    except SpecError as e:   # the helpers name model.*; here the keys live under latents.encoder
        raise SpecError(f"{KEY}.{e.key.split('.', 1)[-1]}", e.message) from None
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    size = enc.get("image_size", cfg.sample_size)
    if size < down or size % down:
        raise SpecError(f"{KEY}.image_size", f"expected a positive multiple of {down} (the VAE downsamples {down}x), got {size!r}")
    scale = float(raw.get("scaling_factor", cfg.scaling_factor))
    shift = float(raw.get("shift_factor") or 0.0)
    params = cast_params({k: params[k] for k in ("encoder", "quant_conv")}, compute)

    def encode(p, x):
        x = jnp.transpose(2.0 * x - 1.0, (2, 0, 1))[None].astype(compute)            # (1, C, H, W)
        mean = vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean[0]     # (h, w, C)
        return (jnp.transpose(mean, (2, 0, 1)).astype(jnp.float32) - shift) * scale

    h = size // down
    return ImageEncoder(model_id=default_model_id(enc, "diffusers-vae-encoder"), apply=encode, params=params,
                        image_shape=(size, size, cfg.in_channels), latent_shape=(cfg.latent_channels, h, h))


ENCODERS: dict[str, Callable[[dict], ImageEncoder]] = {
    "vae-digits": vae_digits_encoder,
    "diffusers-vae": diffusers_vae_encoder,
}


def get_encoder(spec: str | dict) -> ImageEncoder:
    """The encoder a (schema-validated) ``latents.encoder`` value names: a name or a mapping with a kind."""
    enc = {"kind": spec} if isinstance(spec, str) else dict(spec)
    kind = enc.get("kind")
    if kind not in ENCODERS:
        raise SpecError(KEY, f"unknown encoder '{kind}'; expected one of {sorted(ENCODERS)}")
    try:
        return ENCODERS[kind](enc)
    except ValueError as e:
        if isinstance(e, SpecError):
            raise
        raise SpecError(KEY, str(e)) from None
