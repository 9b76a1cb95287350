"""Generators G: R^d -> R^n, looked up by ``model.kind`` (all share :class:`base.Generator`)."""
from __future__ import annotations

import jax.numpy as jnp

from geomjobs.generators.base import Generator
from geomjobs.spec import SpecError


def _zoo(model, dtype):
    from geomjobs.generators.zoo import zoo_generator
    return zoo_generator(model, dtype)


def _mlp(model, dtype):
    from geomjobs.generators.mlp import mlp_generator
    return mlp_generator(model, dtype)


def _python(model, dtype):
    from geomjobs.generators.python_entry import python_generator
    return python_generator(model, dtype)


def _diffusers_vae(model, dtype):
    from geomjobs.generators.diffusers_models import vae_decoder_generator
    return vae_decoder_generator(model, dtype)


def _diffusers_unet(model, dtype):
    from geomjobs.generators.diffusers_models import unet_generator
    return unet_generator(model, dtype)


BUILDERS = {"mlp": _mlp, "python": _python, "zoo": _zoo, "diffusers-vae-decoder": _diffusers_vae,
            "diffusers-unet": _diffusers_unet}


def build_generator(model: dict, dtype: str = "float32") -> Generator:
    """The generator a spec's ``model`` section names (weights loaded, nothing compiled)."""
    kind = model["kind"]
    if kind not in BUILDERS:
        raise SpecError("model.kind", f"kind '{kind}' is not available in this build; expected one of {sorted(BUILDERS)}")
    return BUILDERS[kind](model, jnp.dtype(dtype))


__all__ = ["BUILDERS", "Generator", "build_generator"]
