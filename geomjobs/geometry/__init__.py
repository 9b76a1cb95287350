"""The mathematics of geomjobs (docs/geometry.md): pure JAX, no Ray, no pyarrow.

- :mod:`.projections` draws the fixed matrices W (k x n) and B (P x d) of a job.
- :mod:`.spectrum` gives singular values of the Jacobian (exact, or of W A by batched VJPs).
- :mod:`.estimators` holds the matrix-free Krylov algorithms (Golub-Kahan, SLQ).
- :mod:`.modes` wraps each of them as one local-scaling mode behind one interface.
- :mod:`.descriptors` turns singular values into local scaling psi and local rank nu.
- :mod:`.complexity` counts sign flips of neuron inputs (local complexity delta).
"""
from geomjobs.geometry.descriptors import kept_mask, local_rank, local_scaling, matrix_rank_rtol
from geomjobs.geometry.projections import orthonormal_rows
from geomjobs.geometry.spectrum import exact_singular_values, projected_singular_values

__all__ = [
    "exact_singular_values",
    "kept_mask",
    "local_rank",
    "local_scaling",
    "matrix_rank_rtol",
    "orthonormal_rows",
    "projected_singular_values",
]
