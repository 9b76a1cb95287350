"""Plan a job: build its generator and latents, fill size-dependent defaults, check they fit,
draw W and B. Everything here happens before the first sample is computed, so every spec
problem surfaces as a :class:`SpecError` (exit 2) with no work lost.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np

from geomjobs.generators import Generator, build_generator
from geomjobs.geometry.projections import orthonormal_rows
from geomjobs.latents import LatentSource, build_latents
from geomjobs.spec import SpecError, resolve_paths, spec_hash, validate_spec

EXACT_MAX_ENTRIES = 1 << 22   # default to exact mode while the dense Jacobian has <= 4M entries
DEFAULT_K = 120               # the paper's k for Stable Diffusion
DEFAULT_DIRECTIONS = 4        # the paper's P
# local_scaling keys that only some modes read (exact reads none of them)
MODE_KEYS = {"k": ("projection", "lanczos"), "chunk": ("projection", "slq"),
             "steps": ("slq", "lanczos"), "num_probes": ("slq",)}


@dataclasses.dataclass
class Plan:
    spec: dict                 # fully resolved: stored with the output, compared on resume
    generator: Generator
    latents: LatentSource
    W: np.ndarray | None       # (k, n) for mode projection
    B: np.ndarray | None       # (P, d) for local complexity
    sites: list | None         # indices of counted nonlinearity sites (None = all)
    site_labels: list | None

    @property
    def count(self) -> int:
        return self.latents.count

    @property
    def shard_size(self) -> int:
        return self.spec["execution"]["shard_size"]

    @property
    def num_shards(self) -> int:
        return math.ceil(self.count / self.shard_size)

    def shard_ids(self, shard: int) -> np.ndarray:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        return np.arange(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count), dtype=np.int64)

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)

    @property
    def job_id(self) -> str:
        return self.spec["job_id"]

    def with_output(self, uri: str, job_id: str | None = None) -> "Plan":
        """A new plan whose spec names ``uri`` as its output (and ``job_id``, when given); this
        plan and its spec are left as they are."""
        spec = {**self.spec, "output": uri}
        if job_id is not None:
            spec["job_id"] = job_id
        return dataclasses.replace(self, spec=spec)

    def artifacts(self) -> dict:
        d, n = self.generator.latent_dim, self.generator.output_dim
        return {"W": self.W if self.W is not None else np.zeros((0, n)),
                "B": self.B if self.B is not None else np.zeros((0, d))}


def plan_job(raw_spec: dict) -> Plan:
    spec = resolve_paths(copy.deepcopy(validate_spec(raw_spec)), Path.cwd())
    dtype = spec["execution"]["dtype"]
    if dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)
    gen = build_generator(spec["model"], dtype)
    if gen.timestep is not None and spec["model"]["kind"] == "zoo":
        spec["model"].setdefault("timestep", gen.timestep)
        spec["model"].setdefault("prediction", "eps")
    lat = build_latents(spec["latents"])
    if math.prod(lat.shape) != gen.latent_dim or (len(lat.shape) > 1 and tuple(lat.shape) != tuple(gen.latent_shape)):
        raise SpecError("latents.shape", f"the model takes latents of shape {list(gen.latent_shape)}, "
                                         f"the latent source gives {list(lat.shape)}")
    d, n = gen.latent_dim, gen.output_dim
    desc = spec["descriptors"]
    W = B = sites = labels = None
    if "local_scaling" in desc:
        ls = desc["local_scaling"]
        ls.setdefault("mode", "exact" if d * n <= EXACT_MAX_ENTRIES else "projection")
        if ls["mode"] == "projection":
            ls.setdefault("k", min(DEFAULT_K, n))
            if ls["k"] > n:
                raise SpecError("descriptors.local_scaling.k", f"expected k <= n = {n} (rows of W are orthonormal in R^n), got {ls['k']}")
            # "auto": resolved where the step compiles (Engine._fit_chunk): one pass on a CPU, 32
            # rows at a time on an accelerator, halved until XLA's memory plan fits the budget
            ls.setdefault("chunk", "auto")
            W = orthonormal_rows(ls["k"], n, ls["seed"], stream="W")
        elif ls["mode"] in ("slq", "lanczos"):
            _estimator_defaults(ls, n, d)
        for key, modes in MODE_KEYS.items():
            if key in ls and ls["mode"] not in modes:
                raise SpecError(f"descriptors.local_scaling.{key}", f"only applies to mode: {' or '.join(modes)}")
    if "local_complexity" in desc:
        lc = desc["local_complexity"]
        lc.setdefault("directions", min(DEFAULT_DIRECTIONS, d))
        if lc["directions"] > d:
            raise SpecError("descriptors.local_complexity.directions",
                            f"expected at most d = {d} directions (rows of B are orthonormal in R^d), got {lc['directions']}")
        B = orthonormal_rows(lc["directions"], d, lc["seed"], stream="B")
        sites, labels = _select_sites(gen, lc)
    spec.setdefault("job_id", "job-" + spec_hash(spec)[:12])
    return Plan(spec, gen, lat, W, B, sites, labels)


def _estimator_defaults(ls: dict, n: int, d: int) -> None:
    """Defaults and bounds of the matrix-free modes (geomjobs.geometry.estimators).

    Both run Golub-Kahan-Lanczos on the Jacobian with Krylov vectors in R^c, c = min(n, d), so
    the Krylov depth ``steps`` is at most c; lanczos keeps the top ``k`` <= steps Ritz values.
    """
    from geomjobs.geometry.estimators import DEFAULT_PROBES, DEFAULT_SLQ_STEPS

    c = min(n, d)
    if ls["mode"] == "lanczos":
        ls.setdefault("k", min(DEFAULT_K, c))
        if ls["k"] > c:
            raise SpecError("descriptors.local_scaling.k", f"expected k <= min(n, d) = {c} (A has {c} singular values), got {ls['k']}")
        ls.setdefault("steps", min(c, 2 * ls["k"] + 10))
        if ls["steps"] < ls["k"]:
            raise SpecError("descriptors.local_scaling.steps", f"expected steps >= k = {ls['k']} (k Ritz values need k Krylov steps), got {ls['steps']}")
    else:
        if ls.get("save_singular_values"):
            raise SpecError("descriptors.local_scaling.save_singular_values",
                            "mode slq estimates sum log s_i without individual singular values; use mode lanczos or exact to save them")
        ls.setdefault("num_probes", DEFAULT_PROBES)
        if ls.get("chunk") == "auto":   # slq's auto is the memory bound below
            del ls["chunk"]
        ls.setdefault("steps", min(c, DEFAULT_SLQ_STEPS))
        # probes run side by side in chunks whose Krylov bases (chunk x steps x (n + d)) stay <= 16M values
        ls.setdefault("chunk", max(1, min(ls["num_probes"], (1 << 24) // (ls["steps"] * (n + d)))))
    if ls["steps"] > c:
        raise SpecError("descriptors.local_scaling.steps", f"expected steps <= min(n, d) = {c} (the Krylov space of A^T A has at most {c} dimensions), got {ls['steps']}")


def _select_sites(gen: Generator, lc: dict):
    import jax.numpy as jnp

    from geomjobs.geometry.complexity import select_sites, trace_sites

    all_sites = trace_sites(lambda z: gen.apply(gen.params, z), jnp.zeros(gen.latent_shape, gen.dtype))
    try:
        idx = select_sites(all_sites, names=lc.get("layers"), last=lc.get("last"))
    except ValueError as e:
        raise SpecError("descriptors.local_complexity." + ("layers" if "layers" in lc else "last"), str(e)) from None
    labels = [all_sites[i].label for i in idx]
    return list(idx), labels
