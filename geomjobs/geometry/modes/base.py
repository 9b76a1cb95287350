"""The one interface of the local-scaling estimators (``descriptors.local_scaling.mode``).

An estimator is three pure functions, fixed per mode:

- ``resolve(cfg, dims) -> dict``: the mode's keys with their defaults filled and their bounds
  checked against the generator's sizes (a new mapping; ``cfg`` is left as it is). Raises
  SpecError naming ``descriptors.local_scaling.<key>``.
- ``arrays(cfg, dims) -> {name: ndarray}``: the arrays fixed per job (W, a start vector,
  probes), drawn from ``cfg['seed']`` with NumPy so they depend on nothing but the spec. They
  enter the jitted step as arguments, never as constants.
- ``apply(g, z, arrays, cfg) -> Spectrum``: psi, nu and (when the mode has them) singular
  values for ONE flat latent z of the flat generator g. Static ints (k, steps, chunk) come from
  ``cfg``; every rank tolerance is explicit (``descriptors.local_scaling(s, rtol)``).

``chunks(cfg, platform)`` lists the chunk sizes the engine may compile, best first: one entry
unless the spec asked for ``chunk: auto``, when the engine takes the first whose XLA memory plan
fits (runner/engine.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax

from geomjobs.errors import SpecError

KEY = "descriptors.local_scaling"
# keys every mode reads (filled by the resolver before the mode sees them)
COMMON_KEYS = frozenset({"mode", "seed", "save_singular_values"})


class Dims(NamedTuple):
    n: int   # output dimension of G
    d: int   # latent dimension of G


class Spectrum(NamedTuple):
    local_scaling: jax.Array
    local_rank: jax.Array
    singular_values: jax.Array | None = None


def no_arrays(cfg: Mapping, dims: Dims) -> dict:
    return {}


def one_chunk(cfg: Mapping, platform: str) -> list:
    return [cfg.get("chunk")]


@dataclasses.dataclass(frozen=True)
class Estimator:
    name: str
    keys: frozenset                                   # keys of this mode besides COMMON_KEYS
    resolve: Callable[[Mapping, Dims], dict]
    apply: Callable[[Callable, jax.Array, Mapping, Mapping], Spectrum]
    arrays: Callable[[Mapping, Dims], dict] = no_arrays
    chunks: Callable[[Mapping, str], list] = one_chunk
    has_singular_values: bool = True                  # False: save_singular_values is refused


def bound(cfg: Mapping, key: str, limit: tuple[str, int], why: str) -> None:
    """Refuse ``cfg[key] > limit`` (a (name, value) pair) with a message saying why it exists."""
    name, value = limit
    if cfg[key] > value:
        raise SpecError(f"{KEY}.{key}", f"expected {key} <= {name} = {value} ({why}), got {cfg[key]}")


def output_dim(g: Callable, z) -> int:
    """n of a flat generator at a flat latent, by abstract evaluation (no FLOPs)."""
    return jax.eval_shape(g, z).shape[0]
