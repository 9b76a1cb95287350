"""The in-process driver: compute a job's missing shards in this process, commit each one.

The Ray driver (``geomjobs.runner.ray_driver``) shares the job prologue
(:func:`geomjobs.runner.job.open_job`), the retry policy (:mod:`geomjobs.runner.retry`) and the
job's engine (``plan.make_engine()``, whose ``compute_shard`` gives a shard's rows), and differs
only in where shards run.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import time

from geomjobs.runner.job import JobResult, OpenJob, Progress, ShardEngine, open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_connect import worker_resources
from geomjobs.runner.retry import Retries, format_exception

__all__ = ["JobResult", "blas_threads", "drive_local", "run_local"]


def run_local(spec: dict, out: str | None = None, *, progress: bool = True) -> JobResult:
    """Run a job in this process. Spec problems raise SpecError before any work starts."""
    started = time.time()
    return drive_local(open_job(plan_job(spec), out, started), progress)


def drive_local(job: OpenJob, progress: bool = True) -> JobResult:
    """Compute ``job.todo`` in this process, one shard after another (each one's write overlaps
    the next one's computation)."""
    plan, ds = job.plan, job.ds
    engine = plan.make_engine()
    retries = Retries(plan.spec["execution"]["max_retries"], ds)
    bar = Progress(job, progress)
    with blas_threads(plan.spec["execution"]):
        computed = _compute(job, engine, retries, bar)
    bar.close()
    ds.clean_staging()
    return job.result(computed)


def _compute(job: OpenJob, engine: ShardEngine, retries: Retries, bar: Progress) -> int:
    """Compute ``job.todo``, each shard's write overlapping the next shard's computation (one
    writer thread, at most one table waiting for it). A shard whose computation or write fails
    is retried in line, computed and committed before the next (the retry policy's count)."""
    plan, ds = job.plan, job.ds
    done = [0]

    def settle(shard, write) -> None:
        try:
            write.result()
            done[0] += 1
            bar.update(plan.shard_rows(shard))
        except Exception as e:  # noqa: BLE001 - a failed write is a failed attempt of its shard
            if retries.failed(shard, format_exception(e)):
                _in_line(job, engine, retries, bar, shard, done)
            else:
                bar.update(plan.shard_rows(shard))

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="geomjobs-writer") as writer:
        pending = None
        for shard in job.todo:
            try:
                table = engine.compute_shard(shard)
            except Exception as e:  # noqa: BLE001 - a shard failure is recorded, the job goes on
                if retries.failed(shard, format_exception(e)):
                    _in_line(job, engine, retries, bar, shard, done)
                else:
                    bar.update(plan.shard_rows(shard))
                continue
            if pending is not None:
                settle(*pending)
            pending = shard, writer.submit(ds.commit_shard, shard, table, worker="local", engine=engine.describe())
            del table
        if pending is not None:
            settle(*pending)
    return done[0]


def _in_line(job: OpenJob, engine: ShardEngine, retries: Retries, bar: Progress, shard: int, done: list) -> None:
    """Retry ``shard`` until it commits or its attempts are used up (then it is recorded)."""
    plan, ds = job.plan, job.ds
    while True:
        try:
            ds.commit_shard(shard, engine.compute_shard(shard), worker="local", engine=engine.describe())
            done[0] += 1
            break
        except Exception as e:  # noqa: BLE001 - a shard failure is recorded, the job goes on
            if not retries.failed(shard, format_exception(e)):
                break
    bar.update(plan.shard_rows(shard))


@contextlib.contextmanager
def blas_threads(execution: dict):
    """Run the step with the BLAS threads a Ray worker gets.

    XLA's CPU backend runs LAPACK (the SVD of modes exact and projection) through SciPy's
    OpenBLAS, whose own thread pool defaults to one thread per core and contends with XLA's
    threads. Ray sets ``OMP_NUM_THREADS`` to each worker's CPU count (1 by default); here the
    same limit is applied for the duration of the job (threadpoolctl, undone on exit) unless
    ``OMP_NUM_THREADS`` or ``OPENBLAS_NUM_THREADS`` is set (BENCHMARKS.md, Ray section, has
    what it changes).
    """
    if "OMP_NUM_THREADS" in os.environ or "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=max(1, math.floor(worker_resources(execution)["CPU"])), user_api="blas"):
        yield
