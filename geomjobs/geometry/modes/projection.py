"""``mode: projection``: singular values of W A(z), W (k x n) with orthonormal rows drawn once
per job; k VJPs through one linearisation, ``chunk`` rows at a time, or, where the job's model
makes it cheaper (``cfg['side']``, fixed per job by the local_scaling descriptor's ``bind``), d
JVPs and one product with W (geometry/spectrum.py)."""
from __future__ import annotations

from geomjobs.geometry.descriptors import local_rank, local_scaling, matrix_rank_rtol
from geomjobs.geometry.modes.base import Estimator, Spectrum, bound
from geomjobs.geometry.projections import orthonormal_rows
from geomjobs.geometry.spectrum import AUTO_CHUNK_ACCELERATOR, default_chunk, projected_singular_values

DEFAULT_K = 120   # the paper's k for Stable Diffusion
HALVINGS = (32, 16, 8, 4, 2, 1)


def resolve(cfg, dims):
    out = {"k": min(DEFAULT_K, dims.n), "chunk": "auto", **cfg}
    bound(out, "k", ("n", dims.n), "rows of W are orthonormal in R^n")
    return out


def arrays(cfg, dims):
    return {"W": orthonormal_rows(cfg["k"], dims.n, cfg["seed"], stream="W")}


def apply(g, z, arrays, cfg):
    w = arrays["W"]
    s = projected_singular_values(g, z, w, chunk=cfg["chunk"], side=cfg.get("side", "vjp"))
    rtol = matrix_rank_rtol(w.shape[0], z.shape[0], s.dtype)   # W A is k x d
    return Spectrum(local_scaling(s, rtol), local_rank(s, rtol), s)


def chunks(cfg, platform):
    """``auto``: all k rows in one pass on a CPU, 32 at a time on an accelerator, then halvings
    for the engine to try until XLA's memory plan fits; an explicit chunk is never changed."""
    first = default_chunk(cfg["chunk"], cfg["k"], platform)
    if cfg["chunk"] != "auto":
        return [first]
    return [first] + [c for c in HALVINGS if c < (first or cfg["k"])]


ESTIMATOR = Estimator("projection", frozenset({"k", "chunk"}), resolve, apply, arrays, chunks)
__all__ = ["AUTO_CHUNK_ACCELERATOR", "ESTIMATOR"]
