"""Random weights for diffusers Flax modules built from a config (tests, benchmarks): nothing is
downloaded and no initialiser runs (flax's initialisers, run eagerly, take ~40 s for even a tiny
UNet on two cores)."""
from __future__ import annotations

import jax
import numpy as np


def random_params(shapes, seed: int = 0, spread: float = 0.1):
    """Random float32 params for a tree of shapes (e.g. ``jax.eval_shape(module.init_weights, key)``).

    Kernels (..., fan_in, out) get N(0, 1/fan_in); norm scales 1 + N(0, spread^2); everything else
    (biases, embeddings) N(0, spread^2). With spread > 0 every unit is generic (diffusers' own
    init zeroes the UNet's output conv, which would make eps identically 0); ``spread=0`` gives
    biases 0 and scales 1."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            fan_in = int(np.prod(s.shape[:-1]))
            return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
        base = 1.0 if name == "scale" else 0.0
        if spread == 0:
            return np.full(s.shape, base, np.float32)
        return (base + spread * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def module_random_params(module, seed: int = 0, spread: float = 0.1):
    """:func:`random_params` in the layout the module's ``init_weights`` gives."""
    return random_params(jax.eval_shape(module.init_weights, jax.random.PRNGKey(0)), seed, spread)
