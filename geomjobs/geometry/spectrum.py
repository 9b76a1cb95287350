"""Singular values of the Jacobian A(z) = dG/dz, without forming A for large models.

``exact``: the dense Jacobian (forward mode when d <= n, reverse mode otherwise) and its SVD.
``projection``: M = W A for a fixed W with orthonormal rows, from either side of A:
- ``side="vjp"``: row i of W A is the vector-Jacobian product w_i^T A, so the generator is
  linearized ONCE per sample (``jax.vjp`` keeps the residuals of one forward pass) and all k
  cotangents are pushed through that one linearization in chunks of ``chunk`` rows (``lax.map``
  over chunks, ``vmap`` inside), which bounds memory at chunk x (activation size);
- ``side="jvp"``: column j of A is the Jacobian-vector product A e_j, so d JVPs through one
  linearization (``jax.linearize``) give A, and W A is one (k x n)(n x d) product. Cheaper
  when d is below k (a JVP costs about what a VJP does): the digits models (d = 8, 64), a 2-D
  DDPM, SD's decoder at small latents. :func:`cheaper_side` picks it from XLA's cost counts
  of both sweeps over a batch.
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


def svd_input(m):
    """``m`` as the SVD takes it: at least float32. Rows or columns swept in bfloat16
    (``execution.dtype: bfloat16``) are decomposed in float32; float32 and float64 pass unchanged."""
    return m.astype(jnp.float32) if jnp.finfo(m.dtype).bits < 32 else m


def exact_singular_values(g: Callable, z):
    """Singular values of A(z), descending; the matrix shape is (n, d)."""
    return jnp.linalg.svd(svd_input(jacobian(g, z)), compute_uv=False)


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


def projected_columns(g: Callable, z, w, *, chunk: int | None = None):
    """W A(z) (k x d) from A(z) by d JVPs through one linearization of g at z (``chunk`` tangents
    at a time), then one product with W."""
    _, lin = jax.linearize(g, z)
    eye = jnp.eye(z.shape[0], dtype=z.dtype)
    if chunk is None or chunk >= z.shape[0]:
        at = jax.vmap(lin)(eye)                               # (d, n): A^T
    else:
        at = jax.lax.map(lin, eye, batch_size=chunk)
    at = svd_input(at)                                        # bfloat16 columns: the product in float32
    return jnp.matmul(w.astype(at.dtype), at.T, precision=jax.lax.Precision.HIGHEST)


SIDES = {"vjp": projected_rows, "jvp": projected_columns}


COUNT_BATCH = 16   # the engine's default execution.batch_size: the batch cheaper_side counts at


def cheaper_side(g: Callable, z, k: int, batch: int = COUNT_BATCH) -> str:
    """``"jvp"`` when XLA counts fewer flops for W A from d JVPs and the product with W than from
    k VJPs, each counted as the job runs it: the whole sweep (one linearization, then all rows or
    columns) vmapped over ``batch`` latents. Counting the batched program matters: work that does
    not depend on the latent is traced once per batch, not once per sample (the k cotangents
    pushed through a last linear layer, W w_L^T, are the same for every sample; so are the d unit
    tangents through a first one), and that can swing the choice: an MLP whose wide last layer
    is linear is 5x cheaper by VJPs at batch 16 though d JVPs are cheaper for one sample.
    ``"vjp"`` when d >= k without counting (a JVP is never much cheaper than a VJP), or when the
    backend gives no count."""
    d = z.shape[0]
    if d >= k:
        return "vjp"
    out = jax.eval_shape(g, z)
    zs = jax.ShapeDtypeStruct((batch, d), z.dtype)
    w = jax.ShapeDtypeStruct((k, out.shape[0]), out.dtype)

    def flops(side):
        sweep = jax.vmap(lambda x, w: SIDES[side](g, x, w), in_axes=(0, None))
        try:
            cost = jax.jit(sweep).lower(zs, w).cost_analysis()
        except Exception:  # noqa: BLE001 - a backend without cost analysis
            return None
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return (cost or {}).get("flops")

    jvp, vjp = flops("jvp"), flops("vjp")
    if jvp is None or vjp is None:
        return "vjp"
    return "jvp" if jvp < vjp else "vjp"


def projected_singular_values(g: Callable, z, w, *, chunk: int | None = None, side: str = "vjp"):
    """Singular values of W A(z), descending; the matrix shape is (k, d). ``side``: how W A is
    formed (module doc); the same matrix either way, up to float rounding. Swept in bfloat16 (G's
    params and latent in bf16), the matrix is decomposed in float32 (:func:`svd_input`)."""
    return jnp.linalg.svd(svd_input(SIDES[side](g, z, w, chunk=chunk)), compute_uv=False)
