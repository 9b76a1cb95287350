"""``kind: python``: a generator from user code, ``entrypoint: package.module:function``.

The function is called as ``function(**kwargs)`` and returns ``(apply, params)`` with
``apply(params, z) -> x`` for ONE latent of ``latent_shape``. This imports and runs code named
by the spec's author, with the job's privileges: only run specs you trust.
"""
from __future__ import annotations

import importlib

import jax.numpy as jnp

from geomjobs.errors import SpecError
from geomjobs.generators.base import Generator, output_shape_of


def python_generator(model: dict, dtype=jnp.float32) -> Generator:
    entry = model["entrypoint"]
    mod_name, fn_name = entry.split(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise SpecError("model.entrypoint", f"cannot import module '{mod_name}' ({e})") from None
    factory = getattr(mod, fn_name, None)
    if not callable(factory):
        raise SpecError("model.entrypoint", f"module '{mod_name}' has no callable '{fn_name}'")
    try:
        made = factory(**model.get("kwargs", {}))
    except TypeError as e:
        raise SpecError("model.kwargs", f"'{entry}' rejected the kwargs: {e}") from None
    if not (isinstance(made, tuple) and len(made) == 2 and callable(made[0])):
        raise SpecError("model.entrypoint", f"'{entry}' must return (apply, params) with apply(params, z) -> x")
    apply, params = made
    shape = tuple(model["latent_shape"])
    try:
        out = output_shape_of(apply, params, shape, dtype)
    except Exception as e:
        raise SpecError("model.latent_shape", f"'{entry}' cannot be applied to a latent of shape {list(shape)}: "
                                              f"{type(e).__name__}: {e}") from None
    return Generator(model_id=model.get("model_id", f"python:{entry}"), apply=apply, params=params,
                     latent_shape=shape, output_shape=out, dtype=dtype)
