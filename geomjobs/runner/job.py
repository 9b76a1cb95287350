"""What every driver does around its shards: open (or resume) the job's dataset once, show
progress, and report the outcome from the dataset's manifest.

A driver (``runner.local``, ``runner.ray_driver``) takes an :class:`OpenJob` from
:func:`open_job` and computes ``job.todo``; the plan it uses downstream is ``job.plan``, the one
whose spec names the dataset (the caller's plan is never written to).

The drivers know a job only through :class:`ShardPlan` and :class:`ShardEngine`: a descriptor
job (:class:`geomjobs.runner.plan.Plan`) is one, and so is the sampling stage of a Fisher job
(``geomjobs.fisher.sampling``). Both get the same commit markers, resume, retry policy,
failure records and Ray pool.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa

from geomjobs._version import __version__
from geomjobs.errors import DatasetError, SpecError
from geomjobs.records import SCHEMA_VERSION
from geomjobs.sink.dataset import Dataset
from geomjobs.sink.fs import is_local, normalize_uri
from geomjobs.spec import diff_keys, identity, spec_hash
from geomjobs.zoo.digest import zoo_weights


class ShardEngine(Protocol):
    """What computes a job's shards in one process (built once per process: a model loaded and
    compiled once serves every shard that process computes)."""

    def compute_shard(self, shard: int) -> pa.Table:
        """Shard ``shard``'s rows: a pure function of (plan, shard), whatever process computes
        it. The table has ``sample_id`` and ``status`` columns (the commit marker counts them)."""
        ...

    def describe(self) -> dict:
        """How this process computes (kept in each commit marker); ``display``, when present, is
        the one line ``geomjobs inspect`` prints for it."""
        ...


class ShardedJob:
    """What a plan derives from its ``spec`` and ``count``: shards, identity and a copy naming its
    output. Mixed into frozen dataclasses with a ``spec`` field (``runner.plan.Plan``, the Fisher
    sampling plan), so the shard arithmetic has one home."""
    spec: dict

    @property
    def shard_size(self) -> int:
        return self.spec["execution"]["shard_size"]

    @property
    def num_shards(self) -> int:
        return -(-self.count // self.shard_size)

    def shard_rows(self, shard: int) -> int:
        """How many rows shard ``shard`` holds (without making its ids)."""
        return max(0, min(self.shard_size, self.count - shard * self.shard_size))

    def shard_ids(self, shard: int) -> np.ndarray:
        """The row ids (sample ids, grid points) of shard ``shard``: a contiguous range."""
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.num_shards - 1}")
        return np.arange(shard * self.shard_size, min((shard + 1) * self.shard_size, self.count), dtype=np.int64)

    @property
    def hash(self) -> str:
        return spec_hash(self.spec)

    @property
    def job_id(self) -> str:
        return self.spec["job_id"]

    def with_output(self, uri: str, job_id: str | None = None):
        """A copy whose spec names ``uri`` as its output (and ``job_id``, when given); this plan
        and its spec are left as they are."""
        spec = {**self.spec, "output": uri}
        if job_id is not None:
            spec["job_id"] = job_id
        return dataclasses.replace(self, spec=spec)


class ShardPlan(Protocol):
    """A job as the drivers see it: a resolved spec (with ``output``, ``job_id`` and an
    ``execution`` section: ``shard_size``, ``max_retries``, optional ``workers`` and
    ``resources``), its shards, and how to compute them."""
    spec: dict

    @property
    def count(self) -> int: ...               # rows of the finished dataset
    @property
    def shard_size(self) -> int: ...
    @property
    def num_shards(self) -> int: ...
    @property
    def hash(self) -> str: ...                # identifies what the shards hold (workers check it)
    @property
    def job_id(self) -> str: ...
    @property
    def planner(self) -> Callable[[dict], ShardPlan]: ...   # spec -> plan: how a Ray worker rebuilds it

    def shard_rows(self, shard: int) -> int: ...
    def with_output(self, uri: str, job_id: str | None = None) -> ShardPlan: ...
    def artifacts(self) -> dict[str, np.ndarray]: ...       # _artifacts/projections.npz
    def card(self) -> dict: ...               # job.json fields particular to the job's kind
    def make_engine(self) -> ShardEngine: ...


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
    worker_deaths: int = 0      # Ray workers found dead during this run (at start-up or mid-shard)
    workers_replaced: int = 0   # fresh workers that took a dead one's place and became ready

    @property
    def ok(self) -> bool:
        return self.committed_shards == self.num_shards and self.errors == 0 and self.rows == self.count

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1


@dataclasses.dataclass(frozen=True)
class OpenJob:
    """A job whose dataset is open: ``plan`` names it as output (and carries the stored job id
    on resume); ``todo`` are the shards with no commit marker yet."""
    plan: ShardPlan
    ds: Dataset
    done: frozenset[int]
    todo: list[int]
    started: float

    def result(self, computed: int) -> JobResult:
        """The job's outcome, read from the dataset's manifest (:meth:`Dataset.summary`)."""
        s = self.ds.summary()
        return JobResult(uri=self.ds.uri, job_id=self.plan.job_id, count=self.plan.count,
                         num_shards=self.plan.num_shards, committed_shards=len(s.committed), rows=s.rows,
                         errors=s.errors, failed_shards=sorted(s.failures), computed_shards=computed,
                         seconds=time.time() - self.started)


def open_output(plan: ShardPlan, out: str | None) -> tuple[Dataset, ShardPlan]:
    """The dataset for this job and the plan to run it with (``plan.with_output(...)``; ``plan``
    itself is left as it is). One rule for every verb: an output that holds this same job is
    opened to finish what is missing; one that holds a different job, or anything else, is
    refused (DatasetError naming it) before any work."""
    uri = _output_uri(plan, out)
    ds = Dataset(uri)
    if ds.exists():
        stored = _same_job(ds, plan)
        _same_weights(ds, plan)
        return ds, plan.with_output(ds.uri, job_id=stored["job_id"])
    if not ds.is_empty():
        raise DatasetError(f"output '{ds.uri}' exists and is not a geomjobs dataset; choose an empty location")
    plan = plan.with_output(ds.uri)
    ds.initialize(plan.spec, job_card(plan), plan.artifacts())
    return ds, plan


def check_output(plan: ShardPlan, out: str | None) -> bool:
    """What :func:`open_output` would find, without writing: True when ``out`` holds this job
    complete, False when it is empty or holds this job unfinished; DatasetError otherwise."""
    ds = Dataset(_output_uri(plan, out))
    if ds.exists():
        _same_job(ds, plan)
        _same_weights(ds, plan)
        return len(ds.committed()) == plan.num_shards
    if not ds.is_empty():
        raise DatasetError(f"output '{ds.uri}' exists and is not a geomjobs dataset; choose an empty location")
    return False


def _output_uri(plan: ShardPlan, out: str | None) -> str:
    uri = out or plan.spec.get("output")
    if not uri:
        raise SpecError("output", "no output location: set 'output' in the spec or pass --out")
    if is_local(uri):
        for p in (Path(normalize_uri(uri)), *Path(normalize_uri(uri)).parents):
            if p.exists():
                if not p.is_dir():
                    raise DatasetError(f"output '{uri}': '{p}' is a file, not a folder; choose another --out")
                break
    return uri


def _same_job(ds: Dataset, plan: ShardPlan) -> dict:
    """The stored spec of ``ds`` when it is this plan's job; DatasetError naming the keys that differ."""
    stored = ds.spec()
    if identity(stored) != identity(plan.spec):
        keys = diff_keys(identity(stored), identity(plan.spec))
        raise DatasetError(f"output '{ds.uri}' holds a different job ('{stored.get('job_id')}'; the spec differs at "
                           f"{', '.join(keys[:8])}): run this spec to another --out, or delete that folder first")
    return stored


def _same_weights(ds: Dataset, plan: ShardPlan) -> None:
    """DatasetError when a zoo model the job uses ships other weights than the stored job's card
    records (a card written before the field existed is not checked)."""
    stored = ds.job().get("zoo_weights")
    if stored is None:
        return
    now = zoo_weights(plan.spec)
    changed = sorted(n for n in set(stored) | set(now) if stored.get(n) != now.get(n))
    if changed:
        raise DatasetError(f"output '{ds.uri}' was computed with other weights of zoo model(s) {', '.join(changed)} "
                           f"(sha256 {', '.join(str(stored.get(n)) for n in changed)}; this installation ships "
                           f"{', '.join(str(now.get(n)) for n in changed)}): its records would mix two models; "
                           "run to another --out, or delete that folder first")


def open_job(plan: ShardPlan, out: str | None, started: float | None = None) -> OpenJob:
    """Open the job's output once (:func:`open_output`) and list the shards left to compute.
    ``started``: when the run began (its result's ``seconds`` count from there; default now)."""
    started = time.time() if started is None else started
    ds, plan = open_output(plan, out)
    done = frozenset(ds.committed())
    return OpenJob(plan, ds, done, [s for s in range(plan.num_shards) if s not in done], started)


def job_card(plan: ShardPlan) -> dict:
    """``_geomjobs/job.json``: what every job has, then the fields of its kind (``plan.card()``)."""
    return {"job_id": plan.job_id, "spec_hash": plan.hash, "count": plan.count, "num_shards": plan.num_shards,
            "shard_size": plan.shard_size, "schema_version": SCHEMA_VERSION, "geomjobs_version": __version__,
            "created_at": time.time(), "zoo_weights": zoo_weights(plan.spec), **plan.card()}


class Progress:
    """A progress bar over a job's samples (tqdm on stderr), or nothing when disabled."""

    def __init__(self, job: OpenJob, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            plan = job.plan
            already = sum(plan.shard_rows(s) for s in job.done)
            self._bar = tqdm(total=plan.count, initial=already, unit="sample", desc=plan.job_id, file=sys.stderr,
                             smoothing=0.1, dynamic_ncols=True)

    def update(self, samples: int) -> None:
        if self._bar is not None:
            self._bar.update(samples)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
