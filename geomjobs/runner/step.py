"""The per-sample step of a job, as a pure function built from its plan.

:func:`sample_function` returns ``one(params, arrays, z_flat) -> {column: value}``: the
descriptors the spec asks for at ONE flat latent, where ``params`` is the generator's pytree and
``arrays`` the matrices fixed per job (the estimator's W / start vector / probes, and B for
local complexity). Both enter as arguments, never as constants, so XLA does not fold a large
model's weights into the program. :func:`make_step` vmaps it over a batch and jits it; nothing
here needs a Dataset, Ray or a device.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from geomjobs.geometry.complexity import local_complexity

if TYPE_CHECKING:
    from geomjobs.runner.plan import Plan


def sample_function(plan: Plan, chunk=None) -> Callable:
    """``one(params, arrays, z_flat, t)`` for this plan; ``chunk`` replaces a ``chunk: auto``;
    ``t`` is the record's own timestep (read only when ``plan.per_record_timestep``)."""
    apply, shape = plan.record_apply(), plan.generator.latent_shape
    desc = plan.spec["descriptors"]
    est = plan.estimator
    cfg = {**desc["local_scaling"], "chunk": chunk} if est is not None else None
    lc = desc.get("local_complexity")

    def one(params, arrays, z_flat, t):
        out = {}
        if est is not None:
            g = lambda zf: apply(params, zf.reshape(shape), arrays, t).reshape(-1)  # noqa: E731
            spectrum = est.apply(g, z_flat, arrays, cfg)
            out["local_scaling"] = spectrum.local_scaling
            out["local_rank"] = spectrum.local_rank
            if spectrum.singular_values is not None:
                out["singular_values"] = spectrum.singular_values
        if lc is not None:
            total, per = local_complexity(lambda z: apply(params, z, arrays, t), z_flat.reshape(shape), arrays["B"],
                                          lc["radius"], sites=plan.sites)
            out["local_complexity"] = total
            out["local_complexity_per_layer"] = per
        return out

    return one


def make_step(plan: Plan, chunk=None) -> Callable:
    """``step(params, arrays, z, t)``: :func:`sample_function` over a batch z (m, d) with the
    records' timesteps t (m,) int32, jitted."""
    return jax.jit(jax.vmap(sample_function(plan, chunk), in_axes=(None, None, 0, 0)))
