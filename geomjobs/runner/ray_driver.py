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
* **Faults.** Worker deaths never end a job. Ray does not restart workers (``max_restarts=0``):
  the pool replaces a dead one (killed while starting or mid-shard, its node lost) with a fresh
  actor, without limit, so the driver sees and counts every death (``JobResult.worker_deaths``,
  ``workers_replaced``, a stderr line each) and never waits for one: of the shards a dead worker
  held, the one it was running is charged one attempt and the ones queued behind it go back
  uncharged. SIGTERM (a preemption notice) lets a worker finish its shard; the queued ones are
  handed back and the driver stops it. Attempts per shard are bounded: a shard that raises (a
  poison input) or kills its worker is retried and, after ``execution.max_retries`` retries,
  recorded (``Dataset.record_failure``); the job finishes the rest and exits 1. A worker whose
  constructor raises (model file missing on its node, import error, spec-hash mismatch: Ray's
  creation-task error) cannot start however often it is replaced: the job stops at once with
  WorkerPoolError naming the reason, as it does after ``START_DEATHS_LIMIT`` workers in a row
  died starting with none ready between (killed loading a model too big for its node, say).
  Nothing is written twice: a shard's file name is fixed (``part-<shard>.parquet``), each write
  replaces it atomically with the same records, the marker comes after the file
  (``geomjobs.sink.dataset``): a retried shard that did commit rewrites identical bytes.
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
paths are the same code), and replacing dead workers, bounded attempts and failure records are
a few lines over Ray's own actors, placement and ``ray.wait``.

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
import dataclasses
import logging
import os
import signal
import sys
import time
import traceback

import ray
from ray.exceptions import ActorDiedError, RayActorError, RayError, RayTaskError

from geomjobs.runner.engine import Engine, format_exception
from geomjobs.runner.job import JobResult, OpenJob, Progress, open_job
from geomjobs.runner.plan import Plan, plan_job
from geomjobs.runner.ray_connect import (
    WorkerPoolError,
    actor_options,
    embedded_cpus,
    node_ip,
    pool_size,
    ray_connection,
    worker_resources,
    worker_start_error,
)
from geomjobs.runner.retry import Retries
from geomjobs.runner.shards import compute_shard
from geomjobs.sink.dataset import Dataset

__all__ = ["ShardWorker", "WorkerPoolError", "actor_options", "drive_ray", "pool_size", "run_ray"]

QUEUE_DEPTH = 2            # shards held by one worker: one running, one queued
WAIT_TIMEOUT_S = 30.0      # how often the driver reports while nothing finishes
START_DEATHS_LIMIT = 50    # workers in a row dying while starting, none ready between: cannot start

log = logging.getLogger("geomjobs.ray")


# ---- the worker ------------------------------------------------------------------------
class ShardWorker:
    """One long-lived worker: one plan, one engine (one compile), many shards.

    Made a Ray actor by :class:`_Pool`; plain Python so that it is testable without Ray.
    """

    def __init__(self, spec: dict, spec_hash: str):
        try:
            self.plan = plan_job(spec)
            if self.plan.hash != spec_hash:
                raise RuntimeError(f"this worker plans the job with spec hash {self.plan.hash[:12]}, the driver "
                                   f"with {spec_hash[:12]}: install the driver's geomjobs version on the cluster")
            self.ds = Dataset(self.plan.spec["output"])
            self.engine = Engine(self.plan)
        except Exception as e:   # as a plain RuntimeError: Ray must carry it to the driver (SpecError cannot)
            raise RuntimeError("worker start-up failed:\n" + "".join(traceback.format_exception(e)).rstrip()) from None
        self.name = f"ray:{node_ip()}:{os.getpid()}"
        self.busy = self.stopping = False
        if getattr(ray._private.worker.global_worker, "mode", None) == ray.WORKER_MODE:   # in a Ray worker
            self._exit = signal.getsignal(signal.SIGTERM)   # Ray's: SystemExit
            signal.signal(signal.SIGTERM, self._on_sigterm)  # Ray runs a sync actor's calls in the main thread

    def _on_sigterm(self, signum, frame) -> None:
        """A preemption notice: exit now if idle; else finish the shard being computed, hand back
        the ones queued (:meth:`run`), and let the driver stop this worker."""
        self.stopping = True
        if not self.busy and callable(self._exit):
            self._exit(signum, frame)

    def ready(self) -> dict:
        import jax

        return {"worker": self.name, "pid": os.getpid(), "devices": [str(d) for d in jax.local_devices()],
                "batch_size": self.engine.batch_size, **self.engine.describe()}

    def run(self, shard: int) -> dict:
        """Compute and commit ``shard``: its marker; ``stopping`` if SIGTERM came meanwhile.
        After SIGTERM: ``handed_back``, nothing computed."""
        if self.stopping:
            return {"shard": shard, "handed_back": True}
        t0 = time.time()
        self.busy = True
        try:
            table = compute_shard(self.plan, shard, self.engine)
            marker = self.ds.commit_shard(shard, table, worker=self.name, engine=self.engine.describe())
        finally:
            self.busy = False
        return {**marker, "seconds": time.time() - t0, "stopping": self.stopping}


# ---- the driver ------------------------------------------------------------------------
def run_ray(spec: dict, out: str | None = None, *, address: str | None = None, resume: bool = False,
            progress: bool = True) -> JobResult:
    """Run a job on the Ray cluster at ``address`` ("auto" inside a Ray job; None or "local":
    an embedded Ray for this job) and wait. Same dataset protocol and results as ``run_local``.

    Spec problems raise SpecError before any worker starts; an output that cannot be used
    raises DatasetError. Shards that fail after their retries are recorded and reported in the
    result (exit code 1). Dead workers are replaced for as long as the job runs (the result
    counts them); a worker that raises while starting raises WorkerPoolError naming the reason,
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
        driver = _Driver(job, progress)
        computed = driver.run()
    job.ds.clean_staging()
    return dataclasses.replace(job.result(computed), worker_deaths=driver.pool.deaths,
                               workers_replaced=driver.pool.replaced)


class _Pool:
    """The job's workers, one per slot: 'starting' (its ready() call pending) or 'ready'. A dead
    worker is replaced by a fresh actor in its slot (:meth:`replace`), without limit."""

    def __init__(self, plan: Plan, n: int):
        # the actor class is made here, for this job: no Ray handle outlives the connection; the
        # spec is small: passed inline, so a new worker never depends on an object-store copy
        self.cls = ray.remote(ShardWorker).options(**actor_options(plan.spec["execution"]))
        self.args = (plan.spec, plan.hash)
        self.actors: list = [None] * n
        self.state, self.load = ["starting"] * n, [0] * n
        self.info: list[dict | None] = [None] * n
        self.pings: dict = {}                    # ready() ref -> slot
        self.replacing: set[int] = set()         # slots whose worker replaces a dead one
        self.deaths = self.replaced = self.start_deaths = 0
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        self.actors[i] = self.cls.remote(*self.args)
        self.state[i], self.load[i], self.info[i] = "starting", 0, None
        self.pings[self.actors[i].ready.remote()] = i

    def ping(self, i: int) -> None:
        """Ask a worker whose call failed without saying why whether it is still alive."""
        if self.state[i] == "ready":
            self.state[i] = "starting"
            self.pings[self.actors[i].ready.remote()] = i

    def on_ping(self, ref) -> tuple[int, str] | None:
        """A worker's ready() returned: it is ready (None), or dead (its slot and the error, for
        the caller to hand back its shards and :meth:`replace` it). A worker that raised while
        starting raises WorkerPoolError: no new worker would start either."""
        i = self.pings.pop(ref)
        try:
            self.info[i] = ray.get(ref)
        except RayActorError as e:
            if e.actor_init_failed:
                raise worker_start_error(str(e)) from None
            if self.info[i] is None:             # never ready: it died while starting
                self.start_deaths += 1
            if self.start_deaths >= START_DEATHS_LIMIT:
                raise WorkerPoolError(f"{self.start_deaths} workers in a row died while starting, none became "
                                      f"ready; the last: {_short(e, 500)}") from None
            return i, _short(e)
        except RayError as e:   # ready() raised, an error Ray could not carry, ...
            if self.info[i] is None:                 # while starting: as deterministic
                raise worker_start_error(str(e)) from None
            return i, f"{type(e).__name__}: {_short(e)}"
        self.state[i] = "ready"
        self.start_deaths = 0
        if i in self.replacing:
            self.replacing.discard(i)
            self.replaced += 1
        return None

    def replace(self, i: int) -> None:
        """Slot ``i``'s worker is dead: count it, and start a fresh one there."""
        self.deaths += 1
        with contextlib.suppress(Exception):
            ray.kill(self.actors[i], no_restart=True)
        self.pings = {ref: j for ref, j in self.pings.items() if j != i}   # the dead one's answers
        self.replacing.add(i)
        self._start(i)

    def pick(self, avoid: int | None) -> int | None:
        free = [i for i, s in enumerate(self.state) if s == "ready" and self.load[i] < QUEUE_DEPTH]
        others = [i for i in free if i != avoid] or free
        return min(others, key=lambda i: self.load[i]) if others else None

    def label(self, i: int) -> str:
        return self.info[i]["worker"] if self.info[i] else f"#{i} (starting)"

    def kill_all(self) -> None:
        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


class _Driver:
    """One run of the scheduling loop: hand shards to ready workers (:meth:`dispatch`), wait for
    any shard or worker, and handle what came back (:meth:`on_ready`, :meth:`lost`,
    :meth:`on_failure`)."""

    def __init__(self, job: OpenJob, progress: bool):
        self.job = job
        self.execution = job.plan.spec["execution"]
        self.pool = _Pool(job.plan, pool_size(self.execution, len(job.todo), ray.cluster_resources()))
        self.queue = collections.deque(job.todo)
        self.inflight: dict = {}                  # ref -> (shard, slot), in the order handed out
        self.last_worker: dict[int, int] = {}     # shard -> the slot its last attempt failed on
        self.retries = Retries(self.execution["max_retries"], job.ds)
        self.bar = Progress(job, progress)
        self.computed, self.waited = 0, 0.0

    def run(self) -> int:
        """Until every shard is committed or recorded as failed; returns the shards computed.
        Raises WorkerPoolError if a worker cannot start (:meth:`_Pool.on_ping`)."""
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
                    if (dead := self.pool.on_ping(ready[0])) is not None:
                        self.lost(*dead)
                else:
                    self.on_ready(ready[0])
        finally:
            self.bar.close()
            self.pool.kill_all()
        return self.computed

    def dispatch(self) -> None:
        """Queued shards to ready workers with room, preferring a slot other than the one the
        shard last failed on."""
        while self.queue:
            i = self.pool.pick(self.last_worker.get(self.queue[0]))
            if i is None:
                break
            shard = self.queue.popleft()
            self.inflight[self.pool.actors[i].run.remote(shard)] = (shard, i)
            self.pool.load[i] += 1

    def on_idle(self) -> None:
        self.waited += WAIT_TIMEOUT_S
        if not any(s == "ready" for s in self.pool.state):
            starting = sum(s == "starting" for s in self.pool.state)
            print(f"geomjobs: waiting {self.waited:.0f} s for {starting} workers, each asking Ray for "
                  f"{worker_resources(self.execution)}", file=sys.stderr)

    def on_ready(self, ref) -> None:
        """A shard's run() returned: committed, or failed (raised, or its worker died)."""
        shard, i = self.inflight[ref]
        try:
            reply = ray.get(ref)
        except ActorDiedError as e:                    # the worker process died, or its node
            self.lost(i, _short(e))
            return
        except RayTaskError as e:                      # the shard's computation raised
            self.on_failure(shard, i, _short(e.cause if getattr(e, "cause", None) is not None else e))
        except RayError as e:                          # unreachable worker (node lost?), ...: ask it
            self.lost(i, f"{type(e).__name__}: {_short(e)}", dead=False)
            return
        else:
            if reply.get("stopping") or reply.get("handed_back"):
                self.stopped(i)
                return
            self.committed(reply)
        del self.inflight[ref]
        self.pool.load[i] -= 1

    def committed(self, reply: dict) -> bool:
        if reply.get("handed_back"):       # not computed: the worker had SIGTERM
            return False
        self.computed += 1
        self.bar.update(reply["rows"])
        return True

    def release(self, i: int) -> list[int]:
        """Take back every shard handed to slot ``i``: those that committed count as such; the
        others are returned in the order they were handed out."""
        refs = [ref for ref, (_, w) in self.inflight.items() if w == i]
        finished = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
        shards, self.pool.load[i] = [], 0
        for ref in refs:
            shards.append(self.inflight.pop(ref)[0])
            if ref in finished:
                with contextlib.suppress(RayError):
                    if self.committed(ray.get(ref)):
                        shards.pop()
        return shards

    def lost(self, i: int, error: str, dead: bool = True) -> None:
        """Slot ``i``'s worker is dead (a fresh worker takes the slot), or unreachable (``dead``
        False: it is asked whether it is alive). Of the shards it held and did not commit, the
        first (the one it was running: an actor runs its calls in order) is charged one attempt;
        those queued behind it go back to the queue's front uncharged."""
        label = self.pool.label(i)
        shards = self.release(i)
        running = f"; shard {shards[0]} goes to another worker" if shards else ""
        if dead:
            self.pool.replace(i)
            print(f"geomjobs: worker {label} died, a new one replaces it ({self.pool.deaths} worker deaths so far"
                  f"{running})", file=sys.stderr)
        else:
            self.pool.ping(i)
        log.info("worker %s lost: %s", label, error)
        self.queue.extendleft(reversed(shards[1:]))
        if shards:
            self.on_failure(shards[0], i, f"worker {label} died: {error}")

    def stopped(self, i: int) -> None:
        """Slot ``i``'s worker got SIGTERM (a preemption notice) and finished its shard: the
        shards queued on it go back uncharged, and a fresh worker takes the slot (this one is
        stopped)."""
        label = self.pool.label(i)
        shards = self.release(i)
        self.pool.replace(i)
        print(f"geomjobs: worker {label} stopped on SIGTERM after its shard, a new one replaces it "
              f"({self.pool.deaths} worker deaths so far; handed back: {shards})", file=sys.stderr)
        self.queue.extendleft(reversed(shards))

    def on_failure(self, shard: int, worker: int, error: str) -> None:
        """Queue the shard again, or (its attempts used up) record it as failed."""
        self.last_worker[shard] = worker
        if self.retries.failed(shard, error):
            self.queue.append(shard)
            return
        log.warning("shard %d failed after %d attempts: %s", shard, self.retries.attempts[shard], error)
        self.bar.update(self.job.plan.shard_rows(shard))


def _short(e: BaseException, limit: int = 2000) -> str:
    text = format_exception(e) if not hasattr(e, "error_msg") else str(e)
    return text.strip()[:limit]
