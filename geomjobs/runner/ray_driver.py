"""The Ray driver: a job's shards on a pool of long-lived Ray actors, on a cluster or embedded.

Design
------
* **Workers are actors** (:class:`ShardWorker`). Each one plans the job from the resolved spec
  once (loads the model, draws W and B: ``plan_job`` is deterministic, so every worker holds
  the driver's exact matrices, checked by the spec hash) and builds one engine, which compiles
  one program for the fixed batch shape. It then serves shards for the rest of the job:
  ``compute_shard`` and ``Dataset.commit_shard`` run *in the worker*, so records go from the
  worker straight to the output (local path or gs://), never through the driver; the driver
  only receives each shard's small commit marker.
* **A worker writes shard k while it computes shard k + 1**, as the in-process driver does. A
  shard is two calls to its worker, made together: ``compute(shard, seq)`` and
  ``commit(shard, seq)``. The worker is a threaded actor; computes run one at a time in the
  order handed out (``seq``: one batch in flight on the device), each handing its records to
  the worker's one writer thread and returning at once, so the next compute starts while the
  write runs; ``commit`` returns only when the shard's file and marker are written, and only
  that reply counts the shard as done. ``compute``'s reply tells the driver which shards have
  left the device, which decides what a death is charged (below).
* **Scheduling and backpressure with ``ray.wait``**: every ready worker holds at most
  ``QUEUE_DEPTH`` (2) uncommitted shards (one computing, the one before it being written or the
  one after it queued) so that a worker never idles between shards; the driver waits for any
  shard to commit and hands out the next. In-flight work (and records held in a worker) is
  bounded by ``2 x workers`` shards whatever the job's size.
* **Placement is Ray's**: a worker asks for ``execution.resources`` (``{GPU: 1}``, ``{TPU: 4}``,
  ...; default ``{CPU: 1}``); the pool has ``execution.workers`` of them, or as many as the
  cluster's resources hold. Workers are spread over nodes. A worker that cannot be placed yet
  (autoscaling) simply joins when it becomes ready: work goes only to ready workers.
* **Faults.** Worker deaths never end a job. Ray does not restart workers (``max_restarts=0``):
  the pool replaces a dead one (killed while starting or mid-shard, its node lost) with a fresh
  actor, without limit, so the driver sees and counts every death (``JobResult.worker_deaths``,
  ``workers_replaced``, a stderr line each) and never waits for one: of the shards a dead worker
  held and had not committed, the one on its device is charged one attempt (if none was, the
  one being written), and the others go back uncharged, so each death charges one attempt. A
  worker that cannot be reached (its calls' fate unknown) is replaced the same way. SIGTERM (a
  preemption notice) lets a worker finish the shards it has started (computing or being
  written); those not started are handed back, and the driver stops it once all are back.
  Attempts per shard are bounded: a shard that raises (a poison input) or kills its worker is
  retried and, after ``execution.max_retries`` retries, recorded (``Dataset.record_failure``);
  the job finishes the rest and exits 1. A worker whose constructor raises (model file missing
  on its node, import error, spec-hash mismatch: Ray's creation-task error) cannot start
  however often it is replaced: the job stops at once with WorkerPoolError naming the reason,
  as it does after ``START_DEATHS_LIMIT`` workers in a row died starting with none ready
  between (killed loading a model too big for its node, say).
  Nothing is written twice: a shard's file name is fixed (``part-<shard>.parquet``), each write
  replaces it atomically with the same records, the marker comes after the file
  (``geomjobs.sink.dataset``): a retried shard that did commit rewrites identical bytes, and a
  worker killed mid-write leaves no marker of that shard (at most its file, which the retry
  replaces with the same records, or a staging file no reader sees).
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
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
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

QUEUE_DEPTH = 2            # shards held by one worker: one being computed, one being written or queued
WORKER_THREADS = 2 * QUEUE_DEPTH + 2   # a worker's call threads: compute + commit of each shard, ready()
WAIT_TIMEOUT_S = 30.0      # how often the driver reports while nothing finishes
START_DEATHS_LIMIT = 50    # workers in a row dying while starting, none ready between: cannot start

log = logging.getLogger("geomjobs.ray")


# ---- the worker ------------------------------------------------------------------------
HANDED_BACK = "handed back"    # a shard's outcome when the worker had SIGTERM before computing it


class ShardWorker:
    """One long-lived worker: one plan, one engine (one compile), many shards.

    A shard is two calls, both made when the driver hands it out: :meth:`compute` (the shard's
    ``seq``-th compute on this worker) computes its records and hands them to the worker's
    writer thread, and returns once the shard has left the device; :meth:`commit` returns once
    that write is done, with the commit marker. Computes run one at a time, in ``seq`` order
    (one batch in flight, as in process); the writer writes one shard at a time; so the write
    of shard k overlaps the compute of shard k + 1, as in process (``runner.local``). Made a
    threaded Ray actor by :class:`_Pool` (its calls run in a pool of threads: a compute waiting
    its turn or a commit waiting for its write blocks only its own thread); plain Python, so
    that it is testable without Ray.
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
        self.stopping = False
        self.active = 0                       # shards being computed or written
        self.turn = threading.Condition()     # guards next_seq, outcomes, active
        self.next_seq = 0                     # the compute whose turn it is
        self.outcomes: dict[int, object] = {}  # seq -> its write (a Future), its exception, or HANDED_BACK
        self.device = threading.Lock()        # one compute at a time, whatever the calls' order
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="geomjobs-writer")
        self._exit = None
        if getattr(ray._private.worker.global_worker, "mode", None) == ray.WORKER_MODE \
                and threading.current_thread() is threading.main_thread():   # in a Ray worker
            self._exit = signal.getsignal(signal.SIGTERM)   # Ray's: SystemExit
            signal.signal(signal.SIGTERM, self._on_sigterm)  # run in the main thread, which runs no shard

    def _on_sigterm(self, signum, frame) -> None:
        """A preemption notice: exit now if idle; else finish the shards being computed or
        written, hand back those not started (:meth:`compute`), and let the driver stop this
        worker."""
        self.stopping = True
        if not self.active and callable(self._exit):
            self._exit(signum, frame)

    def ready(self) -> dict:
        import jax

        return {"worker": self.name, "pid": os.getpid(), "devices": [str(d) for d in jax.local_devices()],
                "batch_size": self.engine.batch_size, **self.engine.describe()}

    def compute(self, shard: int, seq: int) -> dict:
        """Compute ``shard`` when the ``seq``-th compute's turn comes, and queue its write. Returns
        ``computed`` (False: it raised, and :meth:`commit` raises it, or it was handed back) and
        ``handed_back`` (SIGTERM came before it started: nothing computed)."""
        with self.turn:
            self.turn.wait_for(lambda: self.next_seq >= seq)
            self.active += 1                  # before the stopping check: SIGTERM now waits for it
        outcome: object = HANDED_BACK
        try:
            if not self.stopping:
                with self.device:
                    t0 = time.time()
                    table = compute_shard(self.plan, shard, self.engine)
                outcome = self.writer.submit(self._write, shard, seq, table, t0, time.time())
        except Exception as e:  # noqa: BLE001 - the shard's failure, for commit() to raise
            outcome = e
        finally:
            with self.turn:
                if not isinstance(outcome, concurrent.futures.Future):
                    self.active -= 1
                self.outcomes[seq] = outcome
                self.next_seq = max(self.next_seq, seq + 1)
                self.turn.notify_all()
        return {"shard": shard, "seq": seq, "computed": isinstance(outcome, concurrent.futures.Future),
                "handed_back": outcome is HANDED_BACK}

    def _write(self, shard: int, seq: int, table, t0: float, t1: float) -> dict:
        try:
            t2 = time.time()
            marker = self.ds.commit_shard(shard, table, worker=self.name, engine=self.engine.describe())
            t3 = time.time()
        finally:
            with self.turn:
                self.active -= 1
        return {**marker, "seconds": (t1 - t0) + (t3 - t2),
                "timeline": {"worker": self.name, "seq": seq, "compute": [t0, t1], "write": [t2, t3]}}

    def commit(self, shard: int, seq: int) -> dict:
        """Wait for the ``seq``-th compute's shard to be written: its commit marker (with
        ``seconds``, ``timeline`` and ``stopping``: SIGTERM came meanwhile), or ``handed_back``
        (not computed: SIGTERM came first). Raises what its compute or write raised."""
        with self.turn:
            self.turn.wait_for(lambda: seq in self.outcomes)
            outcome = self.outcomes.pop(seq)
        if outcome is HANDED_BACK:
            return {"shard": shard, "handed_back": True}
        if isinstance(outcome, BaseException):
            raise outcome
        return {**outcome.result(), "stopping": self.stopping}


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
    """The job's workers, one per slot: 'starting' (its ready() call pending), 'ready', or
    'stopping' (it had SIGTERM: no new shards, replaced once those it holds are back). A dead
    worker is replaced by a fresh actor in its slot (:meth:`replace`), without limit."""

    def __init__(self, plan: Plan, n: int):
        # the actor class is made here, for this job: no Ray handle outlives the connection; the
        # spec is small: passed inline, so a new worker never depends on an object-store copy
        self.cls = ray.remote(ShardWorker).options(**actor_options(plan.spec["execution"]),
                                                   max_concurrency=WORKER_THREADS)
        self.args = (plan.spec, plan.hash)
        self.actors: list = [None] * n
        self.state, self.load = ["starting"] * n, [0] * n
        self.seq = [0] * n                       # compute calls made to each slot's worker
        self.info: list[dict | None] = [None] * n
        self.pings: dict = {}                    # ready() ref -> slot
        self.replacing: set[int] = set()         # slots whose worker replaces a dead one
        self.deaths = self.replaced = self.start_deaths = 0
        for i in range(n):
            self._start(i)

    def _start(self, i: int) -> None:
        self.actors[i] = self.cls.remote(*self.args)
        self.state[i], self.load[i], self.seq[i], self.info[i] = "starting", 0, 0, None
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
        """Slot ``i``'s worker is dead (or stopped, or unreachable): count it, and start a fresh
        one there."""
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
        # commit() ref -> (shard, slot, compute() ref), in the order handed out
        self.inflight: dict = {}
        self.last_worker: dict[int, int] = {}     # shard -> the slot its last attempt failed on
        self.handed_back: dict[int, list[int]] = collections.defaultdict(list)   # slot -> shards, on SIGTERM
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
        shard last failed on. Each shard is its two calls, made together: compute (numbered in
        the order handed out: the worker computes in that order) and commit."""
        while self.queue:
            i = self.pool.pick(self.last_worker.get(self.queue[0]))
            if i is None:
                break
            shard = self.queue.popleft()
            actor, seq = self.pool.actors[i], self.pool.seq[i]
            self.pool.seq[i] += 1
            computed = actor.compute.remote(shard, seq)
            self.inflight[actor.commit.remote(shard, seq)] = (shard, i, computed)
            self.pool.load[i] += 1

    def on_idle(self) -> None:
        self.waited += WAIT_TIMEOUT_S
        if not any(s == "ready" for s in self.pool.state):
            starting = sum(s == "starting" for s in self.pool.state)
            print(f"geomjobs: waiting {self.waited:.0f} s for {starting} workers, each asking Ray for "
                  f"{worker_resources(self.execution)}", file=sys.stderr)

    def on_ready(self, ref) -> None:
        """A shard's commit() returned: committed, handed back (SIGTERM), or failed (raised, or
        its worker died or cannot be reached)."""
        shard, i, _ = self.inflight[ref]
        try:
            reply = ray.get(ref)
        except ActorDiedError as e:                    # the worker process died, or its node
            self.lost(i, _short(e))
            return
        except RayTaskError as e:                      # the shard's computation or write raised
            self.on_failure(shard, i, _short(e.cause if getattr(e, "cause", None) is not None else e))
        except RayError as e:                          # unreachable (node lost?), ...: its calls' fate is
            self.lost(i, f"{type(e).__name__}: {_short(e)}", dead=False)   # unknown, so it is replaced
            return
        else:
            if reply.get("handed_back"):               # not computed: the worker had SIGTERM
                self.handed_back[i].append(shard)
                self.queue.appendleft(shard)
            else:
                self.committed(reply)
            if (reply.get("stopping") or reply.get("handed_back")) and self.pool.state[i] == "ready":
                self.pool.state[i] = "stopping"        # no new shards; those it holds finish or come back
        del self.inflight[ref]
        self.pool.load[i] -= 1
        if self.pool.state[i] == "stopping" and not self.pool.load[i]:
            self.stopped(i)

    def committed(self, reply: dict) -> bool:
        if reply.get("handed_back"):
            return False
        self.computed += 1
        self.bar.update(reply["rows"])
        return True

    def release(self, i: int) -> list[tuple[int, str]]:
        """Take back every shard handed to slot ``i``: those that committed count as such; the
        others are returned in the order they were handed out, each with where it was:
        'writing' (its compute had returned), 'back' (handed back on SIGTERM) or 'device'
        (computing, or queued behind the one computing)."""
        refs = [ref for ref, (_, w, _) in self.inflight.items() if w == i]
        self.pool.load[i] = 0
        if not refs:
            return []
        acks = [self.inflight[ref][2] for ref in refs]
        finished = set(ray.wait(refs + acks, num_returns=2 * len(refs), timeout=0)[0])
        held = []
        for ref in refs:
            shard, _, ack = self.inflight.pop(ref)
            reply, state = {}, {}
            if ref in finished:
                with contextlib.suppress(RayError):
                    reply = ray.get(ref)
                if reply and self.committed(reply):
                    continue
            if ack in finished:
                with contextlib.suppress(RayError):
                    state = ray.get(ack)
            back = reply.get("handed_back") or state.get("handed_back")
            held.append((shard, "back" if back else "writing" if state.get("computed") else "device"))
        return held

    def lost(self, i: int, error: str, dead: bool = True) -> None:
        """Slot ``i``'s worker is dead, or cannot be reached (``dead`` False): a fresh worker takes
        the slot. Of the shards it held and did not commit, one attempt is charged to the one on
        its device (the first not computed: the worker computes in the order handed out), or,
        if none was, to the first being written; the others go back to the queue's front
        uncharged. So every death charges one attempt: attempts per shard stay bounded, and a
        shard that kills its worker while computing is charged on each death it causes. (A
        worker killed within milliseconds of a compute's reply can lose that reply: the driver
        then charges the shard before the one computing. The bound holds either way.)"""
        label = self.pool.label(i)
        held = self.release(i)
        self.handed_back.pop(i, None)
        charged = next((s for s, where in held if where == "device"),
                       next((s for s, where in held if where == "writing"), None))
        self.pool.replace(i)
        running = f"; shard {charged} goes to another worker" if charged is not None else ""
        what = "died" if dead else "cannot be reached"
        print(f"geomjobs: worker {label} {what}, a new one replaces it ({self.pool.deaths} worker deaths so far"
              f"{running})", file=sys.stderr)
        log.info("worker %s lost: %s", label, error)
        self.queue.extendleft(reversed([s for s, _ in held if s != charged]))
        if charged is not None:
            self.on_failure(charged, i, f"worker {label} {what}: {error}")

    def stopped(self, i: int) -> None:
        """Slot ``i``'s worker got SIGTERM (a preemption notice) and every shard it held has come
        back, committed or handed back uncharged (already queued again, :meth:`on_ready`): a
        fresh worker takes the slot (this one is stopped)."""
        label = self.pool.label(i)
        shards = self.handed_back.pop(i, [])
        self.pool.replace(i)
        print(f"geomjobs: worker {label} stopped on SIGTERM after its shards, a new one replaces it "
              f"({self.pool.deaths} worker deaths so far; handed back: {shards})", file=sys.stderr)

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
