"""``kind: diffusers-vae-decoder``: a diffusers Flax VAE decoder (SPEC section 1).

G(z) = vae.decode(z / scaling_factor).sample with z channels-first (C, h, w), as diffusers
takes it, and ``scaling_factor`` from the VAE's config (0.18215 for SD 1.x). Weights come from a
diffusers model folder (``path``, local or gs://; ``subfolder`` e.g. ``vae`` inside a pipeline
folder) through the real ``FlaxAutoencoderKL.from_pretrained``; nothing is downloaded.

diffusers' Flax classes exist up to 0.39.x (removed in 0.40): install the ``diffusers`` extra.
Their ``to_bf16`` helper calls the removed ``jax.tree_map``, so params are cast here with
``jax.tree_util.tree_map``. With ``dtype: bfloat16`` params and activations are bf16 and the
output is cast to float32, so cotangents, VJP rows and singular values stay float32.
"""
from __future__ import annotations

import os
import tempfile

import jax
import jax.numpy as jnp

from geomjobs.generators.base import Generator, output_shape_of
from geomjobs.spec import SpecError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _local_folder(path: str) -> str:
    """A local copy of a gs:// model folder (diffusers reads local folders only)."""
    if "://" not in path:
        return path
    from geomjobs.sink.fs import filesystem

    fs, remote = filesystem(path)
    if not fs.exists(remote):
        raise SpecError("model.path", f"diffusers model folder '{path}' does not exist")
    local = tempfile.mkdtemp(prefix="geomjobs-model-")
    fs.get(remote.rstrip("/") + "/", local + "/", recursive=True)
    return local


def vae_decoder_generator(model: dict, dtype=jnp.float32) -> Generator:
    try:
        from diffusers import FlaxAutoencoderKL
    except ImportError as e:
        raise SpecError("model.kind", "kind 'diffusers-vae-decoder' needs diffusers<0.40 with its Flax classes "
                                      f"(pip install 'geomjobs[diffusers]'): {e}") from None
    name = model.get("dtype", "float32")
    if name not in DTYPES:
        raise SpecError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    act_dtype = DTYPES[name]
    folder = _local_folder(model["path"])
    sub = model.get("subfolder")
    where = os.path.join(folder, sub) if sub else folder
    if not os.path.isdir(where):
        key = "model.subfolder" if sub and os.path.isdir(folder) else "model.path"
        raise SpecError(key, f"diffusers model folder '{where}' does not exist")
    if not os.path.isfile(os.path.join(where, "config.json")):
        raise SpecError("model.path", f"'{where}' has no config.json: expected a diffusers AutoencoderKL folder "
                                      "(written by save_pretrained); for a pipeline folder set subfolder: vae")
    try:
        kw = {"subfolder": sub} if sub else {}
        vae, params = FlaxAutoencoderKL.from_pretrained(folder, dtype=act_dtype, **kw)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
        raise SpecError("model.path", f"cannot load a FlaxAutoencoderKL from '{where}': {type(e).__name__}: {e}") from None
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, act_dtype), params)
    cfg = vae.config
    scale = float(cfg.scaling_factor)
    down = 2 ** (len(cfg.block_out_channels) - 1)
    shape = tuple(model.get("latent_shape") or (cfg.latent_channels, cfg.sample_size // down, cfg.sample_size // down))
    if shape[0] != cfg.latent_channels:
        raise SpecError("model.latent_shape", f"the VAE has {cfg.latent_channels} latent channels, got shape {list(shape)}")

    def apply(p, z):
        x = vae.apply({"params": p}, (z / scale).astype(act_dtype)[None], method=vae.decode).sample[0]
        return x.astype(jnp.float32)

    try:
        out = output_shape_of(apply, params, shape)
    except Exception as e:  # noqa: BLE001
        raise SpecError("model.latent_shape", f"the decoder cannot take a latent of shape {list(shape)}: {e}") from None
    return Generator(model_id=model.get("model_id", f"diffusers-vae:{os.path.basename(model['path'].rstrip('/'))}"),
                     apply=apply, params=params, latent_shape=shape, output_shape=out, dtype=jnp.float32)
