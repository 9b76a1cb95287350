"""``kind: zoo``: models the project trains and ships in ``geomjobs/zoo/`` (with their scripts)."""
from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp

from geomjobs.generators.base import Generator
from geomjobs.generators.ddpm import ddpm_generator
from geomjobs.generators.vae import vae_decoder_generator
from geomjobs.spec import SpecError

DDPM_DEFAULTS = {"timestep": 10, "prediction": "eps"}


def _ddpm_gmm2d(model: dict, dtype) -> Generator:
    resolved = {**copy.deepcopy(model), **{k: model.get(k, v) for k, v in DDPM_DEFAULTS.items()}}
    try:
        gen = ddpm_generator("ddpm-gmm2d", timestep=resolved["timestep"], prediction=resolved["prediction"])
    except ValueError as e:
        raise SpecError("model", str(e)) from None
    return dataclasses.replace(gen, resolved=resolved)


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
}


def zoo_generator(model: dict, dtype=jnp.float32) -> Generator:
    name = model["name"]
    if name not in ZOO:
        raise SpecError("model.name", f"unknown zoo model '{name}'; the zoo has {sorted(ZOO)}")
    return ZOO[name](model, dtype)
