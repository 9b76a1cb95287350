"""``mode: exact``: the dense Jacobian A(z) and its SVD (small generators only)."""
from __future__ import annotations

from geomjobs.geometry.descriptors import local_rank, local_scaling, matrix_rank_rtol
from geomjobs.geometry.modes.base import Estimator, Spectrum, output_dim
from geomjobs.geometry.spectrum import exact_singular_values


def resolve(cfg, dims):
    return dict(cfg)


def apply(g, z, arrays, cfg):
    s = exact_singular_values(g, z)
    rtol = matrix_rank_rtol(output_dim(g, z), z.shape[0], s.dtype)   # A is n x d
    return Spectrum(local_scaling(s, rtol), local_rank(s, rtol), s)


ESTIMATOR = Estimator("exact", frozenset(), resolve, apply)
