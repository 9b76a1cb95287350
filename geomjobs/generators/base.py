"""The model-side interfaces: :class:`Generator` (what every ``model.kind`` builds) and
:class:`ImageEncoder` (what ``latents: {kind: images}`` encodes with).

A generator is a differentiable map G: R^d -> R^n. geomjobs keeps the latent in its natural
shape (``latent_shape``, e.g. (4, 64, 64) for Stable Diffusion) and lets the descriptor code
flatten it; ``apply(params, z)`` maps ONE latent (no batch axis) to ONE output of any shape.
Batching is done by the caller with ``jax.vmap``.

``resolved`` is the spec's ``model`` section with every default the builder applied filled in
(e.g. a zoo DDPM's ``timestep`` and ``prediction``), a new mapping: builders never write into the
section they are given. :func:`geomjobs.generators.build_generator` fills it with a copy of the
section when a builder leaves it empty.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """The noise prediction of a diffusion model, for samplers and per-record timesteps.

    ``eps(params, x_t, t)`` maps ONE noisy latent (no batch axis, shape ``latent_shape``) and an
    integer timestep t in [0, T) (a traced int32 scalar is fine) to eps_theta(x_t, t). ``abar``
    is the model's schedule abar_t, t = 0..T-1, in float64 (:func:`geomjobs.diffusion.abar`). A conditioned
    model (a UNet with a prompt, classifier-free guidance) closes over its conditioning here.
    """
    eps: Callable[[Any, jax.Array, jax.Array], jax.Array]
    abar: Any

    @property
    def num_timesteps(self) -> int:
        return len(self.abar)


@dataclasses.dataclass(frozen=True)
class Generator:
    model_id: str                      # stable name written into every record
    apply: Callable[[Any, jax.Array], jax.Array]
    params: Any                        # pytree of arrays, passed to ``apply``
    latent_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    timestep: int | None = None        # diffusion timestep where it applies
    dtype: Any = jnp.float32           # dtype of latents fed to ``apply``
    prompt_id: int | None = None       # conditioning prompt of a conditioned generator (diffusers-unet)
    resolved: dict = dataclasses.field(default_factory=dict)   # the model section, defaults filled
    denoiser: Denoiser | None = None   # diffusion models: eps_theta(x_t, t) with ``params`` (samplers, trajectories)
    cfg_scale: float | None = None     # classifier-free guidance scale it runs at (diffusers-unet model.cfg_scale)

    @property
    def latent_dim(self) -> int:
        return math.prod(self.latent_shape)

    @property
    def output_dim(self) -> int:
        return math.prod(self.output_shape)

    def flat_fn(self) -> Callable[[jax.Array], jax.Array]:
        """G on flat vectors: R^d -> R^n (what the mathematics in docs/geometry.md is about)."""
        params, apply, shape = self.params, self.apply, self.latent_shape

        def g(z_flat: jax.Array) -> jax.Array:
            return apply(params, z_flat.reshape(shape)).reshape(-1)

        return g


@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """An image encoder: ``apply(params, x)`` maps ONE image of ``image_shape`` to its latent of
    ``latent_shape`` (for a VAE, the posterior mean). Batching is done with ``jax.vmap``."""
    model_id: str
    apply: Callable[[Any, Any], Any]
    params: Any
    image_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]


def output_shape_of(apply: Callable, params: Any, latent_shape, dtype=jnp.float32) -> tuple[int, ...]:
    """Shape of G(z) for one latent, found by abstract evaluation (no FLOPs spent); ``params`` may
    be ShapeDtypeStructs (benchmarks plan models too large to hold)."""
    z = jax.ShapeDtypeStruct(tuple(latent_shape), dtype)
    if any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(params)):
        return tuple(jax.eval_shape(apply, params, z).shape)
    out = jax.eval_shape(lambda z: apply(params, z), z)
    return tuple(out.shape)
