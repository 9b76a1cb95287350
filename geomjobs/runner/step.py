"""The per-sample step of a job, as a pure function built from its plan.

:func:`sample_function` returns ``one(params, arrays, z_flat, t) -> {output: value}``: the
outputs of the plan's descriptors (geomjobs/descriptors/) at ONE flat latent, where ``params`` is
the generator's pytree and ``arrays`` the matrices fixed per job (the descriptors' W / start
vector / probes / B). Both enter as arguments, never as constants, so XLA does not fold a large
model's weights into the program. :func:`make_step` vmaps it over a batch and jits it; nothing
here needs a Dataset, Ray or a device.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax

from geomjobs.descriptors import with_chunk

if TYPE_CHECKING:
    from geomjobs.runner.plan import Plan


def sample_function(plan: Plan, chunk=None) -> Callable:
    """``one(params, arrays, z_flat, t)`` for this plan: every descriptor of the plan in turn;
    ``chunk`` is the chunk of the descriptors that take one (it replaces a ``chunk: auto``); ``t``
    is the record's own timestep (read only when ``plan.per_record_timestep``)."""
    apply, shape = plan.record_apply(), plan.generator.latent_shape
    bound = with_chunk(list(plan.descriptors), chunk)

    def one(params, arrays, z_flat, t):
        g = lambda z: apply(params, z, arrays, t)  # noqa: E731
        z = z_flat.reshape(shape)
        out = {}
        for desc, cfg in bound:
            out.update(desc.compute(g, z, arrays, cfg))
        return out

    return one


def make_step(plan: Plan, chunk=None) -> Callable:
    """``step(params, arrays, z, t)``: :func:`sample_function` over a batch z (m, d) with the
    records' timesteps t (m,) int32, jitted."""
    return jax.jit(jax.vmap(sample_function(plan, chunk), in_axes=(None, None, 0, 0)))
