"""``mode: lanczos``: the top-k singular values of A(z) by Golub-Kahan-Lanczos
(geometry/estimators.py), psi and nu on them with the Krylov rank tolerance."""
from __future__ import annotations

from geomjobs.errors import SpecError
from geomjobs.geometry import estimators as krylov
from geomjobs.geometry.descriptors import local_rank, local_scaling
from geomjobs.geometry.modes.base import KEY, Estimator, Spectrum, bound, output_dim
from geomjobs.geometry.modes.projection import DEFAULT_K


def resolve(cfg, dims):
    c = min(dims.n, dims.d)
    out = {"k": min(DEFAULT_K, c), **cfg}
    bound(out, "k", ("min(n, d)", c), f"A has {c} singular values")
    out = {"steps": min(c, 2 * out["k"] + 10), **out}
    if out["steps"] < out["k"]:
        raise SpecError(f"{KEY}.steps", f"expected steps >= k = {out['k']} (k Ritz values need k Krylov steps), "
                                        f"got {out['steps']}")
    bound(out, "steps", ("min(n, d)", c), f"the Krylov space of A^T A has at most {c} dimensions")
    return out


def arrays(cfg, dims):
    return {"v0": krylov.start_vector(krylov.gram_side(dims.n, dims.d), cfg["seed"])}


def apply(g, z, arrays, cfg):
    s = krylov.lanczos_singular_values(g, z, arrays["v0"], k=cfg["k"], steps=cfg["steps"])
    rtol = krylov.krylov_rtol(output_dim(g, z), z.shape[0], s.dtype)
    return Spectrum(local_scaling(s, rtol), local_rank(s, rtol), s)


ESTIMATOR = Estimator("lanczos", frozenset({"k", "steps"}), resolve, apply, arrays)
