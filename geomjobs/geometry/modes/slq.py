"""``mode: slq``: psi over the full spectrum, 0.5 log det of the Gram matrix, and nu, by
stochastic Lanczos quadrature with Rademacher probes drawn once per job
(geometry/estimators.py). No individual singular values."""
from __future__ import annotations

from geomjobs.geometry import estimators as krylov
from geomjobs.geometry.modes.base import Estimator, Spectrum, bound

KRYLOV_VALUES = 1 << 24   # chunk default: probes side by side whose Krylov bases hold <= 16M values


def resolve(cfg, dims):
    c = min(dims.n, dims.d)
    out = {"num_probes": krylov.DEFAULT_PROBES, "steps": min(c, krylov.DEFAULT_SLQ_STEPS), **cfg}
    bound(out, "steps", ("min(n, d)", c), f"the Krylov space of A^T A has at most {c} dimensions")
    if out.get("chunk", "auto") == "auto":
        # each probe's run keeps steps x (n + d) Krylov values
        out["chunk"] = max(1, min(out["num_probes"], KRYLOV_VALUES // (out["steps"] * (dims.n + dims.d))))
    return out


def arrays(cfg, dims):
    return {"probes": krylov.rademacher_probes(cfg["num_probes"], krylov.gram_side(dims.n, dims.d), cfg["seed"])}


def apply(g, z, arrays, cfg):
    r = krylov.slq_log_volume(g, z, arrays["probes"], steps=cfg["steps"], chunk=cfg["chunk"])
    return Spectrum(r.local_scaling, r.local_rank)


ESTIMATOR = Estimator("slq", frozenset({"num_probes", "steps", "chunk"}), resolve, apply, arrays,
                      has_singular_values=False)
