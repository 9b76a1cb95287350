"""``kind: zoo``: models the project trains and ships in ``geomjobs/zoo/`` (with their scripts)."""
from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp

from geomjobs.errors import SpecError
from geomjobs.generators.base import Generator
from geomjobs.generators.ddpm import ddpm_generator
from geomjobs.generators.dit import dit_generator
from geomjobs.generators.ldm import ldm_generator
from geomjobs.generators.vae import vae_decoder_generator

DDPM_DEFAULTS = {"timestep": 10, "prediction": "eps"}
# the DiT paper's analysis: the x0 prediction at t = 0; ldm-digits follows it
DIT_DEFAULTS = {"timestep": 0, "prediction": "x0"}
LDM_DEFAULTS = {"timestep": 0, "prediction": "x0"}


def _denoiser_builder(name: str, build, defaults: dict):
    """A zoo builder for a diffusion model at a fixed timestep: the section's timestep and
    prediction with ``defaults`` filled in (a new mapping; the input is never written)."""
    def builder(model: dict, dtype) -> Generator:
        resolved = {**copy.deepcopy(model), **{k: model.get(k, v) for k, v in defaults.items()}}
        try:
            gen = build(name, timestep=resolved["timestep"], prediction=resolved["prediction"])
        except ValueError as e:
            raise SpecError("model", str(e)) from None
        return dataclasses.replace(gen, resolved=resolved)

    return builder


_ddpm_gmm2d = _denoiser_builder("ddpm-gmm2d", ddpm_generator, DDPM_DEFAULTS)


def _vae_digits(model: dict, dtype) -> Generator:
    for key in ("timestep", "prediction"):
        if key in model:
            raise SpecError(f"model.{key}", "does not apply to zoo model 'vae-digits' (a VAE decoder has no timestep)")
    try:
        return vae_decoder_generator("vae-digits", dtype)
    except ValueError as e:
        raise SpecError("model", str(e)) from None


ZOO = {
    "ddpm-gmm2d": _ddpm_gmm2d,   # DDPM on a 2-D mixture of 8 Gaussians; input x_t, output eps or x_0
    "vae-digits": _vae_digits,   # beta-VAE decoder on sklearn's 8x8 digits; input z (8,), output image (8, 8)
    # DiT in pixel space on the digits ([-1, 1]); input x_t (8, 8), output x_0 (default) or eps, at t = 0 by default
    "dit-digits": _denoiser_builder("dit-digits", dit_generator, DIT_DEFAULTS),
    # latent diffusion on vae-digits' latents; input z_t (8,), output z_0 (default) or eps; z_0 decodes with vae-digits
    "ldm-digits": _denoiser_builder("ldm-digits", ldm_generator, LDM_DEFAULTS),
    # ldm-digits' architecture trained with 10 digits duplicated 100 times each (memorizes them)
    "memo-digits": _denoiser_builder("memo-digits", ldm_generator, LDM_DEFAULTS),
}


def zoo_generator(model: dict, dtype=jnp.float32) -> Generator:
    name = model["name"]
    if name not in ZOO:
        raise SpecError("model.name", f"unknown zoo model '{name}'; the zoo has {sorted(ZOO)}")
    return ZOO[name](model, dtype)
