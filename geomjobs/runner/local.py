"""Run a job: open (or resume) its dataset, compute the missing shards, commit each one.

This is the in-process driver; the Ray driver (``geomjobs.runner.ray_driver``) shares the
dataset protocol and :func:`compute_shard`, and differs only in where shards run.
"""
from __future__ import annotations

import dataclasses
import sys
import time

from geomjobs.runner.engine import format_exception
from geomjobs.runner.plan import Plan, plan_job
from geomjobs.runner.engine import Engine
from geomjobs.runner.shards import compute_shard
from geomjobs.sink.dataset import Dataset, DatasetError
from geomjobs.spec import SCHEMA_VERSION, SpecError, diff_keys, identity


@dataclasses.dataclass
class JobResult:
    uri: str
    job_id: str
    count: int
    num_shards: int
    committed_shards: int
    rows: int
    errors: int                 # rows with status 'error'
    failed_shards: list[int]    # shards that exhausted their retries
    computed_shards: int        # shards computed by this run (0 for a finished job resumed)
    seconds: float

    @property
    def ok(self) -> bool:
        return self.committed_shards == self.num_shards and self.errors == 0 and self.rows == self.count

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


def open_output(plan: Plan, out: str | None, resume: bool) -> Dataset:
    """The dataset for this job: new, or (with resume) the same job's, never someone else's."""
    uri = out or plan.spec.get("output")
    if not uri:
        raise SpecError("output", "no output location: set 'output' in the spec or pass --out")
    ds = Dataset(uri)
    plan.spec["output"] = ds.uri
    if ds.exists():
        if not resume:
            raise DatasetError(f"output '{ds.uri}' already holds job '{ds.job()['job_id']}'; "
                               "pass --resume to finish it, or choose another --out")
        stored = ds.spec()
        if identity(stored) != identity(plan.spec):
            keys = diff_keys(identity(stored), identity(plan.spec))
            raise DatasetError(f"cannot resume '{ds.uri}': the spec differs from the stored one at {keys}; "
                               "run it to a new --out instead")
        plan.spec["job_id"] = stored["job_id"]
    elif not ds.is_empty() and not resume:
        raise DatasetError(f"output '{ds.uri}' exists and is not a geomjobs dataset; choose an empty location")
    else:
        ds.initialize(plan.spec, job_card(plan), plan.artifacts())
    return ds


def job_card(plan: Plan) -> dict:
    import geomjobs

    return {"job_id": plan.job_id, "spec_hash": plan.hash, "count": plan.count, "num_shards": plan.num_shards,
            "shard_size": plan.shard_size, "schema_version": SCHEMA_VERSION, "model_id": plan.generator.model_id,
            "geomjobs_version": geomjobs.__version__, "created_at": time.time()}


def summarize(ds: Dataset, plan: Plan, computed: int, t0: float) -> JobResult:
    committed = ds.committed()
    failures = ds.failures()
    return JobResult(uri=ds.uri, job_id=plan.job_id, count=plan.count, num_shards=plan.num_shards,
                     committed_shards=len(committed), rows=sum(m["rows"] for m in committed.values()),
                     errors=sum(m["errors"] for m in committed.values()),
                     failed_shards=sorted(set(failures) - set(committed)), computed_shards=computed,
                     seconds=time.time() - t0)


def run_local(spec: dict, out: str | None = None, *, resume: bool = False, progress: bool = True,
              plan: Plan | None = None) -> JobResult:
    """Run a job in this process. Spec problems raise SpecError before any work starts."""
    t0 = time.time()
    plan = plan or plan_job(spec)
    ds = open_output(plan, out, resume)
    done = set(ds.committed())
    todo = [s for s in range(plan.num_shards) if s not in done]
    engine = Engine(plan)
    retries = plan.spec["execution"]["max_retries"]
    bar = _progress(plan, todo, done, progress)
    computed = 0
    for shard in todo:
        for attempt in range(1, retries + 2):
            try:
                table = compute_shard(plan, shard, engine)
                ds.commit_shard(shard, table, worker="local", engine=engine.describe())
                computed += 1
                break
            except Exception as e:  # noqa: BLE001 - a shard failure is recorded, the job goes on
                if attempt > retries:
                    ds.record_failure(shard, format_exception(e), attempt)
        if bar is not None:
            bar.update(len(plan.shard_ids(shard)))
    if bar is not None:
        bar.close()
    ds.clean_staging()
    return summarize(ds, plan, computed, t0)


def _progress(plan: Plan, todo, done, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    already = sum(len(plan.shard_ids(s)) for s in done)
    return tqdm(total=plan.count, initial=already, unit="sample", desc=plan.job_id, file=sys.stderr,
                smoothing=0.1, dynamic_ncols=True)
