"""The Ray driver: a job's shards on a pool of long-lived Ray actors, on a cluster or embedded.

Design
------
* **Workers are actors** (:class:`ShardWorker`). Each one plans the job from the resolved spec
  once (loads the model, draws W and B: ``plan_job`` is deterministic, so every worker holds
  the driver's exact matrices, checked by the spec hash) and builds one engine, which compiles
  one program for the fixed batch shape. It then serves ``run(shard)`` calls for the rest of
  the job: ``compute_shard`` and ``Dataset.commit_shard`` run *in the worker*, so records go
  from the worker straight to the output (local path or gs://), never through the driver; the
  driver only receives each shard's small commit marker.
* **Scheduling and backpressure with ``ray.wait``**: every ready worker holds at most
  ``QUEUE_DEPTH`` (2) shards, one running and one queued so that a worker never idles between
  shards; the driver waits for any shard to finish and hands out the next. In-flight work is
  bounded by ``2 x workers`` whatever the job's size.
* **Placement is Ray's**: a worker asks for ``execution.resources`` (``{GPU: 1}``, ``{TPU: 4}``,
  ...; default ``{CPU: 1}``); the pool has ``execution.workers`` of them, or as many as the
  cluster's resources hold. Workers are spread over nodes. A worker that cannot be placed yet
  (autoscaling) simply joins when it becomes ready: work goes only to ready workers.
* **Faults.** Ray restarts a dead worker process (``max_restarts``); the driver does not wait
  for the restart: the shard the dead worker held goes back to the queue and is handed to a
  live worker (another one when there is one). A shard whose computation raises (a poison
  input) is retried and, after ``execution.max_retries`` retries, recorded with
  ``Dataset.record_failure``; the job finishes the other shards and exits 1. Both kinds of
  failed attempt count towards the same bound, so a shard that kills every worker it touches
  cannot loop forever. Nothing is written twice: a shard's file name is fixed
  (``part-<shard>.parquet``), each write replaces it atomically with the same records, and the
  marker is written after the file (see ``geomjobs.sink.dataset``); a retried shard whose first
  attempt did commit just rewrites identical bytes.
* **Driver death** loses nothing committed: the manifest is the set of markers in the dataset,
  and ``--resume`` computes exactly the shards without one (the dataset protocol, shared with
  the in-process driver).

Why actors + ``ray.wait`` rather than Ray Data
----------------------------------------------
Ray Data's ``map_batches`` over an actor pool would give the pool, placement and retries on
process/node death too. But the unit geomjobs needs is the *shard*, with its own idempotent
file and marker, and the guarantee users rely on is driver resume. Ray Data's driver-resume
support (``ray.data.checkpoint.CheckpointConfig``, 2.55+) is beta, needs a unique id column and
a plan from read to write, and its writes have known problems with write modes and partial
outputs (ray-project/ray issues 55043, 54949). Writing through Ray Data would also put its own
file naming between us and the manifest. With actors, each shard is one call whose outcome
we see, the commit protocol stays the one the local driver uses (so the local and cluster
paths are the same code), and retries, bounded attempts and failure records are a few lines
over Ray's own actor restarts, placement and ``ray.wait``.

Local mode
----------
With no address, ``geomjobs run`` runs this same driver on an embedded Ray started for the job
(``ray.init(address="local")`` on 127.0.0.1, no dashboard; it never attaches to a cluster found
in /tmp/ray; see ``geomjobs.runner.ray_connect``), except for small jobs, which run in process
(``run_local``): see :func:`geomjobs.runner.local_mode`.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

from geomjobs.runner.engine import Engine, format_exception
from geomjobs.runner.job import JobResult, OpenJob, Progress, open_job
from geomjobs.runner.plan import Plan, plan_job
from geomjobs.runner.ray_connect import WorkerPoolError, embedded_cpus, ray_connection, worker_env, worker_resources
from geomjobs.runner.retry import Retries
from geomjobs.runner.shards import compute_shard
from geomjobs.sink.dataset import Dataset
from geomjobs.spec import SpecError

__all__ = ["ShardWorker", "WorkerPoolError", "actor_options", "drive_ray", "pool_size", "run_ray"]

QUEUE_DEPTH = 2            # shards held by one worker: one running, one queued
MAX_RESTARTS = 3           # times Ray restarts one worker process before it is given up
WAIT_TIMEOUT_S = 30.0      # how often the driver reports while nothing finishes

log = logging.getLogger("geomjobs.ray")


# ---- the worker ------------------------------------------------------------------------
class ShardWorker:
    """One long-lived worker: one plan, one engine (one compile), many shards.

    Made a Ray actor by :class:`_Pool`; plain Python so that it is testable without Ray.
    """

    def __init__(self, spec: dict, spec_hash: str):
        self.plan = plan_job(spec)
        if self.plan.hash != spec_hash:
            raise RuntimeError(f"this worker plans the job with spec hash {self.plan.hash[:12]}, the driver with "
                               f"{spec_hash[:12]}: install the driver's geomjobs version on the cluster")
        self.ds = Dataset(self.plan.spec["output"])
        self.engine = Engine(self.plan)
        self.name = f"ray:{_node_ip()}:{os.getpid()}"

    def ready(self) -> dict:
        import jax

        return {"worker": self.name, "pid": os.getpid(), "devices": [str(d) for d in jax.local_devices()],
                "batch_size": self.engine.batch_size, **self.engine.describe()}

    def run(self, shard: int) -> dict:
        t0 = time.time()
        table = compute_shard(self.plan, shard, self.engine)
        marker = self.ds.commit_shard(shard, table, worker=self.name, engine=self.engine.describe())
        return {**marker, "seconds": time.time() - t0}


def _node_ip() -> str:
    try:
        return ray._private.worker.global_worker.node_ip_address   # the address Ray runs this node on
    except Exception:  # noqa: BLE001 - only a label
        import socket

        return socket.gethostname()


# ---- placement -------------------------------------------------------------------------
def actor_options(execution: dict) -> dict:
    res = worker_resources(execution)
    opts = {"num_cpus": res.pop("CPU"), "max_restarts": MAX_RESTARTS, "max_task_retries": 0,
            "scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": worker_env()}}
    if "GPU" in res:
        opts["num_gpus"] = res.pop("GPU")
    if res:
        opts["resources"] = res
    return opts


def pool_size(execution: dict, shards_to_do: int, cluster: dict[str, float]) -> int:
    """``execution.workers``, else as many workers as the cluster's resources hold; never more
    than there are shards to compute."""
    n = execution.get("workers")
    if n is None:
        req = worker_resources(execution)
        fits = [int(cluster.get(k, 0.0) // v) for k, v in req.items() if v > 0]
        n = min(fits) if fits else 1
        if n < 1:
            have = {k: cluster.get(k, 0) for k in req}
            raise SpecError("execution.resources", f"each worker asks for {req} but the cluster has {have}; "
                                                   "set execution.workers to wait for nodes an autoscaler adds")
    return max(1, min(n, shards_to_do))


# ---- the driver ------------------------------------------------------------------------
def run_ray(spec: dict, out: str | None = None, *, address: str | None = None, resume: bool = False,
            progress: bool = True) -> JobResult:
    """Run a job on the Ray cluster at ``address`` ("auto" inside a Ray job; None or "local":
    an embedded Ray for this job) and wait. Same dataset protocol and results as ``run_local``.

    Spec problems raise SpecError before any worker starts; an output that cannot be used
    raises DatasetError. Shards that fail after their retries are recorded and reported in the
    result (exit code 1); if no worker can be started or kept alive, WorkerPoolError is raised
    and committed shards are kept for ``--resume``.
    """
    started = time.time()
    return drive_ray(open_job(plan_job(spec), out, resume, started), address, progress)


def drive_ray(job: OpenJob, address: str | None, progress: bool = True) -> JobResult:
    """Compute ``job.todo`` on a pool of Ray workers (cluster at ``address``, or embedded)."""
    if not job.todo:
        return job.result(0)
    embedded = address in (None, "local")
    num_cpus = embedded_cpus(job.plan.spec["execution"]) if embedded else None
    with ray_connection(address, num_cpus=num_cpus):   # an embedded Ray detects its GPUs
        computed = _Driver(job, progress).run()
    job.ds.clean_staging()
    return job.result(computed)


class _Pool:
    """Worker handles and their state: 'starting' (ready() pending), 'ready', 'dead'."""

    def __init__(self, plan: Plan, n: int):
        # the actor class is made here, for this job: no Ray handle outlives the connection
        cls = ray.remote(ShardWorker).options(**actor_options(plan.spec["execution"]))
        # the spec is small: passed inline, so a restart (Ray re-runs the constructor) never
        # depends on an object-store copy
        self.actors = [cls.remote(plan.spec, plan.hash) for _ in range(n)]
        self.state = ["starting"] * n
        self.load = [0] * n
        self.info: list[dict | None] = [None] * n
        self.pings = {a.ready.remote(): i for i, a in enumerate(self.actors)}
        self.errors: list[str] = []

    def ping(self, i: int) -> None:
        if self.state[i] == "ready":
            self.state[i] = "starting"
            self.pings[self.actors[i].ready.remote()] = i

    def on_ping(self, ref) -> None:
        """A worker's ready() returned: it is ready, or it could not start."""
        i = self.pings.pop(ref)
        try:
            self.info[i] = ray.get(ref)
            self.state[i] = "ready"
        except (RayError, GetTimeoutError) as e:
            self.state[i] = "dead"
            self.errors.append(_short(e))
            log.warning("worker %d could not start: %s", i, _short(e))

    def pick(self, avoid: int | None) -> int | None:
        free = [i for i, s in enumerate(self.state) if s == "ready" and self.load[i] < QUEUE_DEPTH]
        if not free:
            return None
        others = [i for i in free if i != avoid] or free
        return min(others, key=lambda i: self.load[i])

    def label(self, i: int) -> str:
        return self.info[i]["worker"] if self.info[i] else str(i)

    def kill_all(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


class _Driver:
    """One run of the scheduling loop: hand shards to ready workers (:meth:`dispatch`), wait for
    any shard or worker, and handle what came back (:meth:`on_ready`, :meth:`on_failure`)."""

    def __init__(self, job: OpenJob, progress: bool):
        self.job = job
        self.execution = job.plan.spec["execution"]
        self.pool = _Pool(job.plan, pool_size(self.execution, len(job.todo), ray.cluster_resources()))
        self.queue = collections.deque(job.todo)
        self.inflight: dict = {}                  # ref -> (shard, worker index)
        self.last_worker: dict[int, int] = {}     # shard -> the worker its last attempt failed on
        self.retries = Retries(self.execution["max_retries"], job.ds)
        self.bar = Progress(job, progress)
        self.computed = 0
        self.waited = 0.0

    def run(self) -> int:
        """Until every shard is committed or recorded as failed; returns the shards computed."""
        try:
            while self.queue or self.inflight:
                self.dispatch()
                ready, _ = ray.wait(list(self.inflight) + list(self.pool.pings), num_returns=1,
                                    timeout=WAIT_TIMEOUT_S)
                if not ready:
                    self.on_idle()
                    continue
                self.waited = 0.0
                if ready[0] in self.pool.pings:
                    self.pool.on_ping(ready[0])
                else:
                    self.on_ready(ready[0])
        finally:
            self.bar.close()
            self.pool.kill_all()
        return self.computed

    def dispatch(self) -> None:
        """Queued shards to ready workers with room, preferring a worker other than the one the
        shard last failed on. Raises WorkerPoolError when no worker is left to wait for."""
        while self.queue:
            i = self.pool.pick(self.last_worker.get(self.queue[0]))
            if i is None:
                break
            shard = self.queue.popleft()
            self.inflight[self.pool.actors[i].run.remote(shard)] = (shard, i)
            self.pool.load[i] += 1
        if not self.inflight and not self.pool.pings:
            last = f"Last worker error: {self.pool.errors[-1]}" if self.pool.errors else ""
            raise WorkerPoolError("no worker is alive to compute the remaining shards "
                                  f"({len(self.queue)} left; committed shards are kept, rerun with --resume). " + last)

    def on_idle(self) -> None:
        self.waited += WAIT_TIMEOUT_S
        if not any(s == "ready" for s in self.pool.state):
            starting = sum(s == "starting" for s in self.pool.state)
            print(f"geomjobs: waiting {self.waited:.0f} s for {starting} workers, each asking Ray for "
                  f"{worker_resources(self.execution)}", file=sys.stderr)

    def on_ready(self, ref) -> None:
        """A shard's run() returned: committed, or failed (raised, or its worker died)."""
        shard, i = self.inflight.pop(ref)
        self.pool.load[i] -= 1
        try:
            marker = ray.get(ref)
        except RayTaskError as e:                      # the shard's computation raised
            self.on_failure(shard, i, _short(e.cause if getattr(e, "cause", None) is not None else e))
        except RayActorError as e:                     # the worker process died (or vanished)
            self.pool.ping(i)   # ready again after Ray restarts it, or found dead
            self.on_failure(shard, i, f"worker {self.pool.label(i)} died: {_short(e)}")
        except RayError as e:                          # node lost, object lost, ...
            self.pool.ping(i)
            self.on_failure(shard, i, f"{type(e).__name__}: {_short(e)}")
        else:
            self.computed += 1
            self.bar.update(marker["rows"])

    def on_failure(self, shard: int, worker: int, error: str) -> None:
        """Queue the shard again, or (its attempts used up) record it as failed."""
        self.last_worker[shard] = worker
        if self.retries.failed(shard, error):
            self.queue.append(shard)
            return
        log.warning("shard %d failed after %d attempts: %s", shard, self.retries.attempts[shard], error)
        self.bar.update(len(self.job.plan.shard_ids(shard)))


def _short(e: BaseException, limit: int = 2000) -> str:
    text = format_exception(e) if not hasattr(e, "error_msg") else str(e)
    return text.strip()[:limit]
