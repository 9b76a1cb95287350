"""The numeric precision a job runs under, scoped to a ``with`` block."""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp


def precision(dtype) -> contextlib.AbstractContextManager:
    """64-bit JAX types for a float64 job, switched on inside the ``with`` block only (never for
    the whole process, so other jobs and libraries in it keep their setting); for any other
    dtype, the ambient setting."""
    return jax.enable_x64(True) if jnp.dtype(dtype) == jnp.float64 else contextlib.nullcontext()
