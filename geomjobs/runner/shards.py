"""A shard is the unit of work, retry and resume: a contiguous range of sample ids.

:func:`compute_shard` is a pure function of (plan, shard index): the same records whatever
process, machine, shard order or batch size computes it (up to float rounding of batching),
so the local driver and the Ray workers call it unchanged.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from geomjobs.records import records_table
from geomjobs.runner.engine import Engine
from geomjobs.runner.plan import Plan


def compute_shard(plan: Plan, shard: int, engine: Engine) -> pa.Table:
    """The records of one shard, computed by ``engine`` (built once per process from ``plan``:
    the caller owns it, so nothing is cached behind its back)."""
    ids = plan.shard_ids(shard)
    z = plan.latents.latents(ids)
    t = plan.latents.denoiser_timesteps(ids)
    res, errors = engine.compute(z, t)
    ok = np.array([e is None for e in errors])
    n = len(ids)
    gen = plan.generator
    cols: dict = {
        "sample_id": ids,
        "shard_id": np.full(n, shard, np.int32),
        "model_id": [gen.model_id] * n,
        "timestep": [int(v) for v in t] if t is not None else [gen.timestep] * n,
        "prompt_id": [gen.prompt_id] * n,
        "status": ["ok" if o else "error" for o in ok],
        "error": errors,
    }
    cols.update(plan.latents.columns(ids))
    desc = plan.spec["descriptors"]

    def masked(values, cast=float):
        return [cast(v) if o else None for v, o in zip(values, ok)]

    if "local_scaling" in desc:
        cols["local_scaling"] = masked(res["local_scaling"])
        if "local_rank" in desc:
            cols["local_rank"] = masked(res["local_rank"])
        if desc["local_scaling"].get("save_singular_values"):
            cols["singular_values"] = [s.astype(np.float64).tolist() if o else None
                                       for s, o in zip(res["singular_values"], ok)]
    if "local_complexity" in desc:
        cols["local_complexity"] = masked(res["local_complexity"], int)
        if desc["local_complexity"].get("per_layer"):
            cols["local_complexity_per_layer"] = [p.astype(np.int64).tolist() if o else None
                                                  for p, o in zip(res["local_complexity_per_layer"], ok)]
    return records_table(cols, job_metadata={"job_id": plan.job_id, "spec_hash": plan.hash})
