"""Plan a job: build its generator and latents, resolve its descriptors (the size-dependent
defaults, checked to fit), draw the arrays fixed per job and fix what the model's trace decides.
Everything here happens before the first sample is computed, so every spec problem surfaces as a
:class:`SpecError` (exit 2) with no work lost.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from geomjobs import descriptors, diffusion
from geomjobs.descriptors import Bound, Dims
from geomjobs.errors import SpecError
from geomjobs.generators import Generator, build_generator
from geomjobs.latents import LatentSource, build_latents
from geomjobs.runner.engine import Engine
from geomjobs.runner.job import ShardedJob
from geomjobs.runner.precision import precision
from geomjobs.spec import resolve_paths, spec_hash, validate_spec


@dataclasses.dataclass(frozen=True)
class Plan(ShardedJob):
    spec: dict                 # fully resolved: stored with the output, compared on resume
    generator: Generator
    latents: LatentSource
    descriptors: tuple[Bound, ...]   # what the job computes, each with its cfg (descriptors/base.py)
    arrays: dict               # fixed per job: the descriptors' (W, v0, probes, B) and a denoiser's abar
    per_record_timestep: bool = False   # the latents give each record its own denoiser timestep

    @property
    def count(self) -> int:
        return self.latents.count

    @property
    def site_labels(self) -> list | None:
        """The counted nonlinearity sites, where a descriptor counts some (the job card's)."""
        return next((cfg["site_labels"] for _, cfg in self.descriptors if "site_labels" in cfg), None)

    def record_apply(self) -> Callable:
        """``apply(params, z, arrays, t)``: the generator as the job built it, or, where each
        record carries its own timestep (trajectory latents), the model's denoiser at that t,
        giving eps or the x0 prediction (``model.prediction``) with abar_t = ``arrays['abar'][t]``."""
        gen = self.generator
        if not self.per_record_timestep:
            return lambda params, z, arrays, t: gen.apply(params, z)
        eps_fn = gen.denoiser.eps
        if self.spec["model"].get("prediction", "eps") == "eps":
            return lambda params, z, arrays, t: eps_fn(params, z, t)
        return lambda params, z, arrays, t: diffusion.x0_from_eps(z, eps_fn(params, z, t), arrays["abar"][t])

    @property
    def planner(self) -> Callable[[dict], Plan]:
        """How a Ray worker rebuilds this plan from its resolved spec."""
        return plan_job

    def card(self) -> dict:
        """The fields of ``_geomjobs/job.json`` particular to a descriptor job."""
        # entry i of local_complexity_per_layer counts the neurons of this site
        return {"model_id": self.generator.model_id, "local_complexity_sites": self.site_labels}

    def make_engine(self) -> Engine:
        """The per-process engine (compiles the step once)."""
        return Engine(self)

    def artifacts(self) -> dict:
        """``_artifacts/projections.npz``: W (k x n) and B (P x d), empty when unused, and the
        other arrays the estimator drew (Krylov start vector, probes)."""
        d, n = self.generator.latent_dim, self.generator.output_dim
        return {"W": np.zeros((0, n)), "B": np.zeros((0, d)), **self.arrays}


def plan_job(raw_spec: dict) -> Plan:
    """Validate ``raw_spec`` and resolve it against the model it names: a new, complete spec
    (``raw_spec`` is left as it is) with the objects it describes. Two stages, each returning a
    new mapping: :func:`geomjobs.spec.validate_spec` (the schema, and the defaults that need no
    model), then :func:`resolve` (the defaults and bounds that depend on the model's sizes)."""
    spec = resolve_paths(validate_spec(raw_spec), Path.cwd())
    dtype = spec["execution"]["dtype"]
    with precision(dtype):
        gen = build_generator(spec["model"], dtype)
        lat = build_latents(spec["latents"])
        if math.prod(lat.shape) != gen.latent_dim or (len(lat.shape) > 1 and tuple(lat.shape) != tuple(gen.latent_shape)):
            raise SpecError("latents.shape", f"the model takes latents of shape {list(gen.latent_shape)}, "
                                             f"the latent source gives {list(lat.shape)}")
        return resolve(spec, gen, lat)


def resolve(spec: dict, gen: Generator, lat: LatentSource) -> Plan:
    """The plan of a validated spec whose generator and latent source are built."""
    dims = Dims(n=gen.output_dim, d=gen.latent_dim)
    arrays: dict = {}
    model = _resolved(gen, spec["model"])
    # a source that times its records (cheap to ask: a schedule lookup) makes the job's model
    # a denoiser evaluated at each record's own timestep
    per_record = lat.denoiser_timesteps(np.zeros(1, np.int64)) is not None
    if per_record:
        if gen.prompt_id is not None and getattr(lat, "per_sample_prompts", False):
            raise SpecError("latents.prompts", "a trajectory job whose descriptor model is prompt-conditioned (one prompt "
                                               "per job) cannot follow per-sample prompts; remove latents.prompts")
        model = _per_record_model(gen, spec["model"], model)
        arrays["abar"] = np.asarray(gen.denoiser.abar, np.float64)
    desc, bound = descriptors.resolve(spec["descriptors"], dims)
    arrays.update(descriptors.job_arrays(bound, dims))
    resolved = {**spec, "model": model, "latents": _resolved(lat, spec["latents"]), "descriptors": desc}
    resolved.setdefault("job_id", "job-" + spec_hash(resolved)[:12])
    plan = Plan(resolved, gen, lat, tuple(bound), arrays, per_record)
    if any(d.bind is not None for d, _ in bound):
        plan = dataclasses.replace(plan, descriptors=_bind(plan))
    return plan


def _per_record_model(gen: Generator, given: dict, model: dict) -> dict:
    """The model section of a job whose records carry their own timesteps: a diffusion model,
    with no timestep of its own (its builder's default timestep is dropped)."""
    if gen.denoiser is None:
        raise SpecError("model", f"trajectory latents evaluate the job's model at each record's own timestep; "
                                 f"model '{gen.model_id}' has no noise prediction (use the diffusion model of latents.model)")
    if "timestep" in given:
        raise SpecError("model.timestep", "a trajectory job evaluates the model at each record's own timestep; "
                                          "remove model.timestep")
    return {k: v for k, v in model.items() if k != "timestep"}


def _resolved(built, section: dict) -> dict:
    """The spec section a generator or latent source ran with: its ``resolved`` mapping (every
    default its builder applied), or the section as given where the builder applied none."""
    return dict(built.resolved) if built.resolved else section


def _bind(plan: Plan) -> tuple[Bound, ...]:
    """Each descriptor's cfg with what it fixes from the model's trace (at t = 0, zero latent)."""
    import jax.numpy as jnp

    gen, apply = plan.generator, plan.record_apply()
    arrays = {k: jnp.asarray(v, gen.dtype) for k, v in plan.arrays.items()}
    t = jnp.zeros((), jnp.int32)
    g, z = (lambda z: apply(gen.params, z, arrays, t)), jnp.zeros(gen.latent_shape, gen.dtype)
    return tuple(Bound(d, cfg if d.bind is None else {**cfg, **d.bind(cfg, g, z)}) for d, cfg in plan.descriptors)
