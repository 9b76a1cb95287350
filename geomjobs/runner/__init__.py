"""Running jobs: plan (resolve + check, before any work), shards (pure (plan, i) -> records),
and the drivers that schedule shards: in process (``runner.local``) or on Ray
(``runner.ray_driver``), both opening the job's dataset through ``runner.job``.

This module chooses between them for a job run with no cluster address (:func:`run_default`).
It imports the drivers (and so JAX and Ray) only when a job runs.
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from geomjobs.runner.job import JobResult
    from geomjobs.runner.plan import Plan

SMALL_JOB_SHARDS = 8       # local mode: at most this many shards to compute ...
SMALL_JOB_SAMPLES = 1024   # ... or this many samples: in process, no Ray


def local_mode(plan: Plan, shards_to_do: int) -> str:
    """'process' or 'ray' for a job run with no address.

    In process (``run_local``, no Ray) when the job asks for one worker
    (``execution.workers: 1``), or when it does not say and is small: at most
    ``SMALL_JOB_SHARDS`` shards or ``SMALL_JOB_SAMPLES`` samples left to compute, where starting
    Ray (seconds) would cost more than it gives. Otherwise an embedded Ray runs the cluster
    driver. ``GEOMJOBS_LOCAL_MODE=process|ray`` forces either.
    """
    forced = os.environ.get("GEOMJOBS_LOCAL_MODE", "auto").lower()
    if forced in ("process", "ray"):
        return forced
    workers = plan.spec["execution"].get("workers")
    if workers == 1:
        return "process"
    samples = shards_to_do * plan.shard_size
    if workers is None and (shards_to_do <= SMALL_JOB_SHARDS or samples <= SMALL_JOB_SAMPLES):
        return "process"
    return "ray"


def run_default(spec: dict, out: str | None = None, *, progress: bool = True) -> JobResult:
    """What ``geomjobs run`` does without ``--address``: plan the job, open its dataset once,
    then compute the shards left in process or on an embedded Ray (see :func:`local_mode`)."""
    from geomjobs.runner.job import open_job
    from geomjobs.runner.plan import plan_job

    started = time.time()
    job = open_job(plan_job(spec), out, started)
    if local_mode(job.plan, len(job.todo)) == "process":
        from geomjobs.runner.local import drive_local

        return drive_local(job, progress)
    from geomjobs.runner.ray_driver import drive_ray

    return drive_ray(job, "local", progress)
