"""A small DDPM on a 2-D mixture of Gaussians, used as a generator at a fixed timestep t.

The model is ``eps_theta(x_t, t)``: an MLP with ReLU activations whose input is x_t concatenated
with a sinusoidal embedding of the integer timestep t. ReLU is deliberate: the geometry code counts
linear regions (sign patterns of the ReLU pre-activations), and at a fixed t the map x_t -> eps is
piecewise affine.

Conventions (Ho et al. 2020, with timesteps numbered 0..T-1):

    beta_t     linear from beta_start to beta_end, t = 0..T-1
    alpha_t    = 1 - beta_t
    abar_t     = prod_{s<=t} alpha_s
    x_t        = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   eps ~ N(0, I)
    x0_hat     = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t)

(the formulas live in :mod:`geomjobs.diffusion`).

``ddpm_generator(name, timestep, prediction)`` returns a :class:`Generator` whose latent is x_t
(shape (2,)) and whose output is eps_theta(x_t, t) (``prediction="eps"``) or x0_hat
(``prediction="x0"``), and whose ``denoiser`` is eps_theta(params, x_t, t) at any t with the
float64 schedule (samplers, per-record timesteps). Weights ship in ``geomjobs/zoo/`` as ``<stem>.npz`` (the flattened Flax
param pytree, '/'-joined keys) plus ``<stem>.json`` (architecture, schedule, data, training);
``geomjobs/zoo/train_ddpm_gmm2d.py`` reproduces them; its data and ancestral sampler are in
:mod:`geomjobs.zoo.gmm2d`.
"""
from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Denoiser, Generator, output_shape_of
from geomjobs.generators.checkpoint import (
    read_meta,
    read_params,
    resolve_pair,
    save_pair,
    zoo_path,  # noqa: F401 - zoo_path is re-exported
)

# zoo name -> file stem in geomjobs/zoo/
ZOO_FILES = {"ddpm-gmm2d": "ddpm_gmm2d"}
PREDICTIONS = ("eps", "x0")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

def timestep_embedding(t: jax.Array, dim: int, max_period: float) -> jax.Array:
    """Sinusoidal embedding of (integer) timesteps, shape t.shape + (dim,).

    Frequencies are geometric from 1 down to 1/max_period (use max_period ~ T so that every
    channel varies over the range of timesteps actually used).
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class EpsMLP(nn.Module):
    """eps_theta(x_t, t): [x_t, emb(t)] -> (Dense, ReLU) x depth -> Dense(data_dim).

    ``x`` has shape (..., data_dim); ``t`` is broadcast against x's leading axes, so both a single
    point with a scalar t and a batch with per-sample t work.
    """
    data_dim: int = 2
    hidden: int = 128
    depth: int = 3
    emb_dim: int = 32
    max_period: float = 100.0

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t), x.shape[:-1])
        h = jnp.concatenate([x, timestep_embedding(t, self.emb_dim, self.max_period)], axis=-1)
        for _ in range(self.depth):
            h = nn.relu(nn.Dense(self.hidden, param_dtype=jnp.float32)(h))
        return nn.Dense(self.data_dim, param_dtype=jnp.float32)(h)


ARCH_KEYS = ("data_dim", "hidden", "depth", "emb_dim", "max_period")


def module_from_config(arch: dict) -> EpsMLP:
    return EpsMLP(**{k: arch[k] for k in ARCH_KEYS})


def module_config(module: EpsMLP) -> dict:
    return {"name": "EpsMLP", "activation": "relu", **{k: getattr(module, k) for k in ARCH_KEYS}}


# --------------------------------------------------------------------------------------------
# schedule
# --------------------------------------------------------------------------------------------

def betas(schedule: dict) -> np.ndarray:
    """beta_0..beta_{T-1} (float32) for a schedule dict {"kind": "linear", "T", "beta_start", "beta_end"}."""
    if schedule.get("kind", "linear") != "linear":
        raise ValueError(f"unsupported noise schedule kind {schedule.get('kind')!r}; expected 'linear'")
    return diffusion.schedule_betas(schedule).astype(np.float32)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------

_WHAT, _SCRIPT = "DDPM", "geomjobs.zoo.train_ddpm_gmm2d"


def _resolve(path_or_name) -> tuple[Path, Path]:
    return resolve_pair(path_or_name, ZOO_FILES, what=_WHAT, script=_SCRIPT)


def _read_meta(json_path: Path) -> dict:
    return read_meta(json_path, {"architecture": ARCH_KEYS, "schedule": ("T", "beta_start", "beta_end")}, what=_WHAT, script=_SCRIPT)


def _read_params(npz_path: Path, module) -> Any:
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((module.data_dim,)), jnp.zeros((), jnp.int32)))
    return read_params(npz_path, shapes, what=_WHAT, script=_SCRIPT)


def load_ddpm(path_or_name="ddpm-gmm2d") -> tuple[EpsMLP, Any, dict]:
    """(module, params, meta) for a zoo name (``"ddpm-gmm2d"``) or a path to a .npz/.json pair (or their stem)."""
    npz_path, json_path = _resolve(path_or_name)
    meta = _read_meta(json_path)
    try:
        module = module_from_config(meta["architecture"])
    except Exception as e:
        raise ValueError(f"DDPM metadata file '{json_path}': bad architecture {meta['architecture']} ({e})") from None
    return module, _read_params(npz_path, module), meta


def save_ddpm(stem, module: EpsMLP, params, meta: dict) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (flattened float32 params, '/'-joined keys) and ``<stem>.json``."""
    return save_pair(stem, params, {**meta, "architecture": module_config(module)})


# --------------------------------------------------------------------------------------------
# the generator (sampling and the training data: geomjobs.zoo.gmm2d)
# --------------------------------------------------------------------------------------------

def ddpm_generator(name: str = "ddpm-gmm2d", timestep: int = 10, prediction: str = "eps") -> Generator:
    """The DDPM at a fixed timestep as a map x_t -> eps_theta(x_t, t) or x_t -> x0_hat (both R^2 -> R^2)."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {list(PREDICTIONS)}, got {prediction!r}")
    module, params, meta = load_ddpm(name)
    T = int(meta["schedule"]["T"])
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Integral):
        raise ValueError(f"timestep must be an integer in [0, {T - 1}] (T = {T}), got {timestep!r}")
    t = int(timestep)
    if not 0 <= t <= T - 1:
        raise ValueError(f"timestep {t} is outside the valid range [0, {T - 1}] for '{name}' (T = {T})")
    abar64 = diffusion.abar({**meta["schedule"], "kind": "linear"})
    abar = float(np.float32(abar64[t]))        # abar_t rounded to the model's float32, as it was trained
    t_arr = np.int32(t)

    if prediction == "eps":
        def apply(p, x):
            return module.apply(p, x, t_arr)
    else:
        def apply(p, x):
            return diffusion.x0_from_eps(x, module.apply(p, x, t_arr), abar)

    latent_shape = (module.data_dim,)
    model_id = name if str(name) in ZOO_FILES else f"ddpm:{Path(str(name)).with_suffix('').name}"
    return Generator(model_id=model_id, apply=apply, params=params, latent_shape=latent_shape,
                     output_shape=output_shape_of(apply, params, latent_shape), timestep=t, dtype=jnp.float32,
                     denoiser=Denoiser(eps=module.apply, abar=abar64))
