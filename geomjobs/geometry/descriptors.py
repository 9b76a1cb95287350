"""Local scaling psi and local rank nu from singular values (docs/geometry.md).

Both read the same singular values s_1 >= s_2 >= ... of M (M = A, W A, or a Krylov estimate).
Only values above the rank tolerance count: s_i > s_1 * rtol. The documented rtol (docs/geometry.md) is
numpy.linalg.matrix_rank's, max(rows, cols) * eps(dtype of the SVD) (:func:`matrix_rank_rtol`);
an estimator whose roundoff is larger passes its own (``modes.lanczos``). Functions take one
spectrum (1-D); vmap them for a batch. They stay finite-shaped under jit: dropped values are
masked, never sliced away.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def matrix_rank_rtol(rows: int, cols: int, dtype) -> float:
    """numpy.linalg.matrix_rank's relative threshold for a (rows x cols) matrix of ``dtype``."""
    return max(rows, cols) * float(np.finfo(dtype).eps)


def kept_mask(s, rtol):
    """Which singular values count: s_i > s_1 * rtol. Strict '>' so an all-zero matrix keeps none."""
    return s > jnp.max(s) * rtol


def local_scaling(s, rtol):
    """psi = sum of log s_i over kept singular values (log of the local change of volume).

    -inf is impossible by construction (zeros are never kept); an all-zero Jacobian gives 0.
    """
    keep = kept_mask(s, rtol)
    return jnp.sum(jnp.where(keep, jnp.log(jnp.where(keep, s, 1.0)), 0.0))


def local_rank(s, rtol):
    """nu = exp(entropy of p), p_i = s_i / sum_j s_j over kept values (Roy & Vetterli 2007).

    Between 1 (one direction dominates) and m (all kept values equal); 1 for an all-zero matrix.
    """
    keep = kept_mask(s, rtol)
    kept = jnp.where(keep, s, 0.0)
    total = jnp.sum(kept)
    p = kept / jnp.where(total > 0, total, 1.0)
    # 0 log 0 = 0: mask before the log so no nan enters the gradient-free sum.
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp))
