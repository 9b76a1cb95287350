"""The in-process driver: compute a job's missing shards in this process, commit each one.

The Ray driver (``geomjobs.runner.ray_driver``) shares the job prologue
(:func:`geomjobs.runner.job.open_job`), the retry policy (:mod:`geomjobs.runner.retry`) and
:func:`compute_shard`, and differs only in where shards run.
"""
from __future__ import annotations

import contextlib
import math
import os
import time

from geomjobs.runner.engine import Engine, format_exception
from geomjobs.runner.job import JobResult, OpenJob, Progress, open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_connect import worker_resources
from geomjobs.runner.retry import Retries
from geomjobs.runner.shards import compute_shard

__all__ = ["JobResult", "blas_threads", "drive_local", "run_local"]


def run_local(spec: dict, out: str | None = None, *, resume: bool = False, progress: bool = True) -> JobResult:
    """Run a job in this process. Spec problems raise SpecError before any work starts."""
    started = time.time()
    return drive_local(open_job(plan_job(spec), out, resume, started), progress)


def drive_local(job: OpenJob, progress: bool = True) -> JobResult:
    """Compute ``job.todo`` in this process, one shard after another."""
    plan, ds = job.plan, job.ds
    engine = Engine(plan)
    retries = Retries(plan.spec["execution"]["max_retries"], ds)
    bar = Progress(job, progress)
    with blas_threads(plan.spec["execution"]):
        computed = _compute(job, engine, retries, bar)
    bar.close()
    ds.clean_staging()
    return job.result(computed)


def _compute(job: OpenJob, engine: Engine, retries: Retries, bar: Progress) -> int:
    plan, ds = job.plan, job.ds
    computed = 0
    for shard in job.todo:
        while True:
            try:
                table = compute_shard(plan, shard, engine)
                ds.commit_shard(shard, table, worker="local", engine=engine.describe())
                computed += 1
                break
            except Exception as e:  # noqa: BLE001 - a shard failure is recorded, the job goes on
                if not retries.failed(shard, format_exception(e)):
                    break
        bar.update(len(plan.shard_ids(shard)))
    return computed


@contextlib.contextmanager
def blas_threads(execution: dict):
    """Run the step with the BLAS threads a Ray worker gets.

    XLA's CPU backend runs LAPACK (the SVD of modes exact and projection) through SciPy's
    OpenBLAS, whose own thread pool defaults to one thread per core and contends with XLA's
    threads. Ray sets ``OMP_NUM_THREADS`` to each worker's CPU count (1 by default); here the
    same limit is applied for the duration of the job (threadpoolctl, undone on exit) unless
    ``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS`` is set. See BENCHMARKS.md (Ray section):
    without it the in-process path ran at 0.7x one Ray worker on 2 cores.
    """
    if "OMP_NUM_THREADS" in os.environ or "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, math.floor(worker_resources(execution)["CPU"])), user_api="blas"):
        yield
