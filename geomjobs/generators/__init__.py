"""Generators G: R^d -> R^n, looked up by ``model.kind`` in :data:`BUILDERS` (all share
:class:`base.Generator`). A builder takes the (schema-validated) ``model`` section and the job's
dtype, never writes into the section, and may return the section with its defaults filled as
``Generator.resolved`` (else :func:`build_generator` stores a copy of the section there)."""
from __future__ import annotations

import copy
import dataclasses

import jax.numpy as jnp

from geomjobs.errors import SpecError
from geomjobs.generators.base import Generator, ImageEncoder
from geomjobs.generators.diffusers import unet_generator, vae_decoder_generator
from geomjobs.generators.dit_folder import dit_folder_generator
from geomjobs.generators.mlp import mlp_generator
from geomjobs.generators.python_entry import python_generator
from geomjobs.generators.zoo import zoo_generator
from geomjobs.spec import current_model_keys

BUILDERS = {"mlp": mlp_generator, "python": python_generator, "zoo": zoo_generator,
            "diffusers-vae-decoder": vae_decoder_generator, "diffusers-unet": unet_generator,
            "dit": dit_folder_generator}


def build_generator(model: dict, dtype: str = "float32") -> Generator:
    """The generator a spec's ``model`` section names (weights loaded, nothing compiled); renamed
    keys are taken under their new names (:func:`geomjobs.spec.current_model_keys`)."""
    model = current_model_keys(model)
    kind = model["kind"]
    if kind not in BUILDERS:
        raise SpecError("model.kind", f"kind '{kind}' is not available in this build; expected one of {sorted(BUILDERS)}")
    gen = BUILDERS[kind](model, jnp.dtype(dtype))
    return gen if gen.resolved else dataclasses.replace(gen, resolved=copy.deepcopy(model))


__all__ = ["BUILDERS", "Generator", "ImageEncoder", "build_generator"]
