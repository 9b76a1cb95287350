"""Singular values of the Jacobian A(z) = dG/dz, without forming A for large models.

``exact``: the dense Jacobian (forward mode when d <= n, reverse mode otherwise) and its SVD.
``projection``: M = W A for a fixed W with orthonormal rows. Row i of W A is the
vector-Jacobian product w_i^T A, so the generator is linearized ONCE per sample (``jax.vjp``
keeps the residuals of one forward pass) and all k cotangents are pushed through that one
linearization in chunks of ``chunk`` rows (``lax.map`` over chunks, ``vmap`` inside), which
bounds memory at chunk x (activation size) instead of k x (activation size).
Both functions take ONE flat latent; vmap them over a batch.

Chunking has a price on XLA:CPU: a convolution inside a while loop (which ``lax.map`` is)
misses the fast convolution path (jax-ml/jax#12868; the figures are in BENCHMARKS.md, sd
section). So ``chunk: auto`` (the job default, :func:`default_chunk`) pushes all k rows in
one vmapped pass on a CPU, where host memory is plentiful, and chunks of 32 on an
accelerator, where memory bounds the sweep.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def jacobian(g: Callable, z):
    """Dense n x d Jacobian of flat g at flat z, in the cheaper autodiff mode."""
    n = jax.eval_shape(g, z).shape[0]
    d = z.shape[0]
    return (jax.jacfwd if d <= n else jax.jacrev)(g)(z)


def exact_singular_values(g: Callable, z):
    """Singular values of A(z), descending; the matrix shape is (n, d)."""
    return jnp.linalg.svd(jacobian(g, z), compute_uv=False)


AUTO_CHUNK_ACCELERATOR = 32


def default_chunk(chunk, k: int, platform: str) -> int | None:
    """The chunk size to run: ``chunk`` as given if it is an int, or for ``"auto"``/None no
    chunking (None) on ``platform == "cpu"`` and ``min(k, 32)`` rows at a time elsewhere."""
    if isinstance(chunk, int):
        return chunk
    if chunk not in (None, "auto"):
        raise ValueError(f"chunk: expected a positive integer or 'auto', got {chunk!r}")
    return None if platform == "cpu" else min(k, AUTO_CHUNK_ACCELERATOR)


def projected_rows(g: Callable, z, w, *, chunk: int | None = None):
    """W A(z) (k x d) from one linearization of g at z: k VJPs, ``chunk`` at a time."""
    out, vjp = jax.vjp(g, z)
    k = w.shape[0]
    w = w.astype(out.dtype)
    if chunk is None or chunk >= k:
        return jax.vmap(lambda c: vjp(c)[0])(w)
    return jax.lax.map(lambda c: vjp(c)[0], w, batch_size=chunk)


def projected_singular_values(g: Callable, z, w, *, chunk: int | None = None):
    """Singular values of W A(z), descending; the matrix shape is (k, d)."""
    return jnp.linalg.svd(projected_rows(g, z, w, chunk=chunk), compute_uv=False)
