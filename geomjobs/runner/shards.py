"""A shard is the unit of work, retry and resume: a contiguous range of sample ids.

:func:`compute_shard` is a pure function of (plan, shard index): the same records whatever
process, machine, shard order or batch size computes it (up to float rounding of batching),
so the local driver and the Ray workers call it unchanged.

Inside a shard the latents are made one chunk ahead of the engine (a thread: the engine's
compiled step releases the GIL), for sources that are plain host code
(``LatentSource.host_only``); the chunks are whole engine batches, so the batches the engine
sees are the ones it would see for the whole shard. Record columns are built as arrays
(no per-record Python loop beyond the error list).
"""
from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from geomjobs.records import records_table

if TYPE_CHECKING:
    from geomjobs.runner.engine import Engine
    from geomjobs.runner.plan import Plan

PREFETCH_SAMPLES = 2048    # latents are made this many samples (rounded to whole batches) ahead


def compute_shard(plan: Plan, shard: int, engine: Engine) -> pa.Table:
    """The records of one shard, computed by ``engine`` (built once per process from ``plan``:
    the caller owns it, so nothing is cached behind its back)."""
    ids = plan.shard_ids(shard)
    res, errors, t = _descriptors(plan, ids, engine)
    return shard_table(plan, shard, ids, res, errors, t)


def _inputs(plan: Plan, ids: np.ndarray):
    return plan.latents.latents(ids), plan.latents.denoiser_timesteps(ids)


def _descriptors(plan: Plan, ids: np.ndarray, engine: Engine):
    """The engine's results and errors for ``ids``, and the records' own timesteps (or None)."""
    bs = engine.batch_size
    step = bs * max(1, PREFETCH_SAMPLES // bs)
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)] or [ids]
    if len(chunks) == 1 or not getattr(plan.latents, "host_only", False):
        z, t = _inputs(plan, ids)
        res, errors = engine.compute(z, t)
        return res, errors, t
    parts, errors, times = [], [], []
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="geomjobs-latents") as pool:
        ahead = pool.submit(_inputs, plan, chunks[0])
        for k in range(len(chunks)):
            z, t = ahead.result()
            if k + 1 < len(chunks):
                ahead = pool.submit(_inputs, plan, chunks[k + 1])
            r, e = engine.compute(z, t)
            parts.append(r)
            errors += e
            times.append(t)
    res = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    t = None if times[0] is None else np.concatenate(times)
    return res, errors, t


def shard_table(plan: Plan, shard: int, ids: np.ndarray, res: dict, errors: list, t) -> pa.Table:
    """The shard's records in the record schema, from the engine's per-sample arrays."""
    n = len(ids)
    ok = np.fromiter((e is None for e in errors), bool, count=n)
    bad = ~ok
    gen = plan.generator
    cols: dict = {
        "sample_id": ids,
        "shard_id": np.full(n, shard, np.int32),
        "model_id": pa.repeat(gen.model_id, n),
        "timestep": np.asarray(t, np.int32) if t is not None else pa.repeat(gen.timestep, n).cast(pa.int32()),
        "prompt_id": pa.repeat(gen.prompt_id, n).cast(pa.int64()),
        "cfg_scale": pa.repeat(gen.cfg_scale, n).cast(pa.float64()),   # generated latents: the sampler's (columns)
        "status": np.where(ok, "ok", "error"),
        "error": errors,
    }
    cols.update(plan.latents.columns(ids))
    for desc, cfg in plan.descriptors:
        cols.update(desc.columns(res, bad, cfg))
    return records_table(cols, job_metadata={"job_id": plan.job_id, "spec_hash": plan.hash})
