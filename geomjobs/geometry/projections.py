"""Fixed random matrices with orthonormal rows, drawn once per job from a seed.

W (k x n) projects the output space for ``mode: projection``; B (P x d) holds the
cross-polytope directions of local complexity. Both are drawn with NumPy's PCG64 from the
job's seed, not with jax.random, so that the matrices do not depend on the JAX version, the
backend or the device count; they are saved in ``_artifacts/projections.npz`` anyway.
"""
from __future__ import annotations

import numpy as np


def seeded_rng(seed: int, stream: str) -> np.random.Generator:
    """NumPy's PCG64 seeded by (seed, stream): ``stream`` (its first 8 bytes) separates the
    independent draws of one job seed (W, B, the Krylov probes)."""
    tag = int.from_bytes(stream.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng([seed, tag])


def orthonormal_rows(rows: int, cols: int, seed: int, *, stream: str) -> np.ndarray:
    """A (rows x cols) float64 matrix with orthonormal rows (M M^T = I), Haar distributed.

    ``stream`` separates independent uses of one seed (W and B of the same job must differ).
    """
    if rows > cols:
        raise ValueError(f"cannot draw {rows} orthonormal rows in dimension {cols} (need rows <= cols)")
    if rows < 1:
        raise ValueError(f"need at least one row, got {rows}")
    g = seeded_rng(seed, stream).standard_normal((cols, rows))
    q, r = np.linalg.qr(g)  # q: cols x rows, orthonormal columns
    # Fix the signs so the draw is Haar (QR alone is not: r's diagonal sign would bias q).
    q *= np.sign(np.diag(r))[None, :]
    return np.ascontiguousarray(q.T)
