"""A small beta-VAE on scikit-learn's handwritten digits; its decoder is the zoo generator ``vae-digits``.

Data: scikit-learn's 1797 handwritten 8x8 digits scaled to [0, 1]
(:func:`geomjobs.zoo.digits.digits_images`, with its fixed held-out split ``digits_split``).

Model (:class:`BetaVAE`, an MLP, all hidden activations ReLU):

    encoder  x (8x8, flattened to 64) -> Dense 256 -> ReLU -> Dense 128 -> ReLU -> (mu, log sigma^2) in R^8 x R^8
    decoder  z in R^8 -> Dense 128 -> ReLU -> Dense 256 -> ReLU -> Dense 64 (linear) -> 8x8 image

Objective (per image, averaged over the batch), a Gaussian likelihood with fixed pixel std
``obs_std`` and the beta-weighted KL to N(0, I) (Higgins et al. 2017):

    loss = ||x - dec(z)||^2 / (2 obs_std^2) + beta * KL(N(mu, diag sigma^2) || N(0, I)),
    z = mu + sigma * eps,  KL = 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)

(the Gaussian normalising constant is dropped). Shipped: beta = 4, obs_std = 0.1.

Why ReLU in the decoder: the decoder is then a continuous piecewise-affine map R^8 -> R^64, the
setting of the local-geometry paper: the Jacobian A(z) is constant on each linear region, psi and
nu are region-wise constants, and delta counts genuine knots (sign changes of ReLU inputs) rather
than zero level sets of a smooth surrogate. The output layer is linear (the Gaussian mean), so no
output nonlinearity adds to delta. (SiLU decoders reconstruct about as well on this data.)

Weights ship in ``geomjobs/zoo/`` as ``vae_digits.npz`` (the flattened Flax params of encoder and
decoder, '/'-joined keys, float32) plus ``vae_digits.json`` (architecture, objective, data, split,
training, held-out evaluation, command); ``python -m geomjobs.zoo.train_vae_digits`` reproduces them.

Public API:
    load_vae(name_or_path)            -> (module, params, meta)
    save_vae(stem, module, params, meta)
    vae_decoder_generator(name, dtype) -> Generator   latent (8,) -> image (8, 8), model_id "vae-digits"
Elsewhere: the encoder mean as an ImageEncoder, geomjobs.generators.encoders.vae_digits_encoder;
data, loss and reconstruction, geomjobs.zoo.digits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from geomjobs.generators.base import Generator, output_shape_of
from geomjobs.generators.checkpoint import (
    read_meta,
    read_params,
    resolve_pair,
    save_pair,
    zoo_path,  # noqa: F401 - zoo_path is re-exported
)

# zoo name -> file stem in geomjobs/zoo/
ZOO_FILES = {"vae-digits": "vae_digits"}

ARCH_KEYS = ("image_shape", "latent_dim", "enc_hidden", "dec_hidden")


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

class BetaVAE(nn.Module):
    """MLP VAE with ReLU hidden layers. ``encode`` and ``decode`` work on any leading batch axes:
    ``encode(x)`` takes (..., *image_shape) and returns (mu, logvar), each (..., latent_dim);
    ``decode(z)`` takes (..., latent_dim) and returns (..., *image_shape)."""
    image_shape: tuple = (8, 8)
    latent_dim: int = 8
    enc_hidden: tuple = (256, 128)
    dec_hidden: tuple = (128, 256)

    def setup(self):
        self.enc = [nn.Dense(h, param_dtype=jnp.float32) for h in self.enc_hidden]
        self.enc_mu = nn.Dense(self.latent_dim, param_dtype=jnp.float32)
        self.enc_logvar = nn.Dense(self.latent_dim, param_dtype=jnp.float32)
        self.dec = [nn.Dense(h, param_dtype=jnp.float32) for h in self.dec_hidden]
        self.dec_out = nn.Dense(math.prod(self.image_shape), param_dtype=jnp.float32)

    def encode(self, x):
        nd = len(self.image_shape)
        h = jnp.reshape(x, x.shape[: x.ndim - nd] + (-1,))
        for layer in self.enc:
            h = nn.relu(layer(h))
        return self.enc_mu(h), self.enc_logvar(h)

    def decode(self, z):
        h = z
        for layer in self.dec:
            h = nn.relu(layer(h))
        out = self.dec_out(h)
        return jnp.reshape(out, out.shape[:-1] + tuple(self.image_shape))

    def __call__(self, x, eps):
        """(reconstruction from z = mu + sigma * eps, mu, logvar)."""
        mu, logvar = self.encode(x)
        z = mu + jnp.exp(0.5 * logvar) * eps
        return self.decode(z), mu, logvar


def module_from_config(arch: dict) -> BetaVAE:
    return BetaVAE(image_shape=tuple(int(s) for s in arch["image_shape"]), latent_dim=int(arch["latent_dim"]),
                   enc_hidden=tuple(int(h) for h in arch["enc_hidden"]),
                   dec_hidden=tuple(int(h) for h in arch["dec_hidden"]))


def module_config(module: BetaVAE) -> dict:
    return {"name": "BetaVAE", "kind": "mlp", "activation": "relu", "decoder_output": "linear (Gaussian mean)",
            "image_shape": list(module.image_shape), "latent_dim": module.latent_dim,
            "enc_hidden": list(module.enc_hidden), "dec_hidden": list(module.dec_hidden)}


def init_params(module: BetaVAE, key) -> Any:
    return module.init(key, jnp.zeros(module.image_shape, jnp.float32), jnp.zeros((module.latent_dim,), jnp.float32))


def _subtree(params, prefix: str) -> dict:
    return {"params": {k: v for k, v in params["params"].items() if k.startswith(prefix)}}


def decoder_params(params) -> dict:
    return _subtree(params, "dec")


def encoder_params(params) -> dict:
    return _subtree(params, "enc")


# --------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------

_WHAT, _SCRIPT = "VAE", "geomjobs.zoo.train_vae_digits"


def _resolve(path_or_name) -> tuple[Path, Path]:
    return resolve_pair(path_or_name, ZOO_FILES, what=_WHAT, script=_SCRIPT)


def _read_meta(json_path: Path) -> dict:
    return read_meta(json_path, {"architecture": ARCH_KEYS, "objective": ("beta", "obs_std")}, what=_WHAT, script=_SCRIPT)


def _read_params(npz_path: Path, module) -> Any:
    return read_params(npz_path, jax.eval_shape(lambda: init_params(module, jax.random.PRNGKey(0))), what=_WHAT, script=_SCRIPT)


def load_vae(path_or_name="vae-digits") -> tuple[BetaVAE, Any, dict]:
    """(module, params, meta) for a zoo name (``"vae-digits"``) or a path to a .npz/.json pair (or their stem)."""
    npz_path, json_path = _resolve(path_or_name)
    meta = _read_meta(json_path)
    try:
        module = module_from_config(meta["architecture"])
    except Exception as e:
        raise ValueError(f"VAE metadata file '{json_path}': bad architecture {meta['architecture']} ({e})") from None
    return module, _read_params(npz_path, module), meta


def save_vae(stem, module: BetaVAE, params, meta: dict) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (flattened float32 params, '/'-joined keys) and ``<stem>.json``."""
    return save_pair(stem, params, {**meta, "architecture": module_config(module)})


def vae_model_id(name) -> str:
    """The record's model_id: the zoo name, or ``vae:<file stem>``."""
    return str(name) if str(name) in ZOO_FILES else f"vae:{Path(str(name)).with_suffix('').name}"


# --------------------------------------------------------------------------------------------
# the decoder as a generator (the encoder: geomjobs.generators.encoders.vae_digits_encoder)
# --------------------------------------------------------------------------------------------

def vae_decoder_generator(name="vae-digits", dtype=jnp.float32) -> Generator:
    """The decoder z (latent_dim,) -> image ``image_shape`` (the Gaussian mean, unclipped).

    Only the decoder's parameters are carried (cast to ``dtype``); the function traced for delta
    holds exactly the decoder's ReLUs."""
    module, params, _ = load_vae(name)
    dtype = jnp.dtype(dtype)
    dparams = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), decoder_params(params))

    def apply(p, z):
        return module.apply(p, z, method=BetaVAE.decode)

    latent_shape = (module.latent_dim,)
    return Generator(model_id=vae_model_id(name), apply=apply, params=dparams, latent_shape=latent_shape,
                     output_shape=output_shape_of(apply, dparams, latent_shape, dtype), timestep=None, dtype=dtype)
