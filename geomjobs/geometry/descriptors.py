"""Local scaling psi and local rank nu from singular values (SPEC section 2).

Both read the same singular values s_1 >= s_2 >= ... of M (M = A, or M = W A). Only values
above the rank tolerance count, as numpy.linalg.matrix_rank decides it:
s_i > s_1 * max(rows, cols) * eps(dtype of the SVD).
Functions take one spectrum (1-D); vmap them for a batch. They stay finite-shaped under jit:
dropped values are masked, never sliced away.
"""
from __future__ import annotations

import jax.numpy as jnp


def rank_tolerance(s, rows: int, cols: int):
    """numpy.linalg.matrix_rank's default threshold for a (rows x cols) matrix with spectrum s."""
    return jnp.max(s) * max(rows, cols) * jnp.finfo(s.dtype).eps


def kept_mask(s, rows: int, cols: int):
    """Which singular values count. Strict '>' so an all-zero matrix keeps none."""
    return s > rank_tolerance(s, rows, cols)


def local_scaling(s, rows: int, cols: int):
    """psi = sum of log s_i over kept singular values (log of the local change of volume).

    -inf is impossible by construction (zeros are never kept); an all-zero Jacobian gives 0.
    """
    keep = kept_mask(s, rows, cols)
    return jnp.sum(jnp.where(keep, jnp.log(jnp.where(keep, s, 1.0)), 0.0))


def local_rank(s, rows: int, cols: int):
    """nu = exp(entropy of p), p_i = s_i / sum_j s_j over kept values (Roy & Vetterli 2007).

    Between 1 (one direction dominates) and m (all kept values equal).
    """
    keep = kept_mask(s, rows, cols)
    kept = jnp.where(keep, s, 0.0)
    total = jnp.sum(kept)
    p = kept / jnp.where(total > 0, total, 1.0)
    # 0 log 0 = 0: mask before the log so no nan enters the gradient-free sum.
    plogp = jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)
    return jnp.exp(-jnp.sum(plogp))
