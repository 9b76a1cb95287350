"""``ldm-digits``: Stable Diffusion in miniature. A diffusion model on the latents of the shipped
``vae-digits`` encoder, so that noise -> DDIM -> z_0 -> ``vae-digits`` decoder makes a digit,
exactly as SD's UNet samples latents that its VAE decodes.

Latent space: the posterior means mu(x) in R^8 of the ``vae-digits`` encoder
(:func:`geomjobs.generators.encoders.vae_digits_encoder`), UNSCALED. SD multiplies its VAE's
latents by a scaling factor (0.18215) so that they have about unit variance and divides it back
before decoding; here the measured standard deviation of the training digits' posterior means is
already ~0.96 (the card's ``latent.measured_std``), so the scaling factor is 1.0 and a generated
z_0 is a ``vae-digits`` latent as it stands: ``latents: {kind: sampled, model: {kind: zoo, name:
ldm-digits}}`` with job ``model: {kind: zoo, name: vae-digits}`` line up without any conversion.

Model: :class:`geomjobs.generators.ddpm.EpsMLP` (the ``ddpm-gmm2d`` eps-network: [z_t, sinusoidal
embedding of t] -> ReLU MLP -> eps) with data_dim 8. Schedule: linear betas 1e-4..0.02, T = 1000
(:mod:`geomjobs.diffusion`), eps-prediction. Training: ``python -m geomjobs.zoo.train_ldm_digits``.

Public API:
    load_ldm(name_or_path) -> (module, params, meta)
    ldm_generator(name, timestep=0, prediction="x0") -> Generator z_t (8,) -> x0_hat or eps (8,),
        with ``denoiser`` for samplers and per-record timesteps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from geomjobs import diffusion
from geomjobs.generators.base import Generator
from geomjobs.generators.ddpm import ARCH_KEYS, EpsMLP, module_from_config
from geomjobs.generators.diffusion_zoo import SCHEDULE_KEYS, denoiser_generator, load_flax_pair

ZOO_FILES = {"ldm-digits": "ldm_digits", "memo-digits": "memo_digits"}   # memo-digits: geomjobs.zoo.train_memo_digits
_WHAT, _SCRIPT = "LDM", "geomjobs.zoo.train_ldm_digits"


def init_params(module: EpsMLP, key) -> Any:
    return module.init(key, jnp.zeros((module.data_dim,), jnp.float32), jnp.zeros((), jnp.int32))


def load_ldm(path_or_name="ldm-digits") -> tuple[EpsMLP, Any, dict]:
    """(module, params, meta) for a zoo name or a path to a .npz/.json pair (or their stem)."""
    module, params, meta = load_flax_pair(path_or_name, ZOO_FILES, {"architecture": ARCH_KEYS, "schedule": SCHEDULE_KEYS,
                                                                    "latent": ("autoencoder", "scaling_factor")},
                                          module_from_config, init_params, what=_WHAT, script=_SCRIPT)
    if float(meta["latent"]["scaling_factor"]) != 1.0:
        raise ValueError(f"{_WHAT} metadata file for {path_or_name!r}: latent.scaling_factor must be 1.0 "
                         f"(generated latents feed the vae-digits decoder unchanged), got {meta['latent']['scaling_factor']}")
    return module, params, meta


def ldm_generator(name="ldm-digits", timestep: int = 0, prediction: str = "x0") -> Generator:
    """The latent denoiser at a fixed timestep: z_t (8,) -> x0_hat (default) or eps (8,)."""
    module, params, meta = load_ldm(name)

    def eps_fn(p, z, t):
        return module.apply(p, z, t)

    model_id = str(name) if str(name) in ZOO_FILES else f"ldm:{Path(str(name)).with_suffix('').name}"
    return denoiser_generator(model_id, eps_fn, params, diffusion.abar(meta["schedule"]), (module.data_dim,), timestep, prediction)
