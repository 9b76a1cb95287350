"""The Ray driver: a job's shards on a pool of long-lived Ray actors (``runner.ray_worker``,
``runner.ray_pool``), on a cluster or embedded. One scheduling loop (:class:`_Driver`) hands
shards to ready workers, waits with ``ray.wait`` and settles what comes back: commits, failures
(retried, then recorded), worker deaths (charged one attempt, the worker replaced) and SIGTERM
hand-backs. The design and why it is built on actors rather than Ray Data: ``docs/ray.md``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import sys
import time

import ray
from ray.exceptions import ActorDiedError, RayError, RayTaskError

from geomjobs.runner.job import JobResult, OpenJob, Progress, open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_connect import embedded_cpus, pool_size, ray_connection, worker_resources
from geomjobs.runner.ray_pool import Pool, short_error
from geomjobs.runner.retry import Retries

__all__ = ["drive_ray", "run_ray"]

WAIT_TIMEOUT_S = 30.0      # how often the driver reports while nothing finishes

log = logging.getLogger("geomjobs.ray")


def run_ray(spec: dict, out: str | None = None, *, address: str | None = None,
            progress: bool = True) -> JobResult:
    """Run a job on the Ray cluster at ``address`` ("auto" inside a Ray job; None or "local":
    an embedded Ray for this job) and wait. Same dataset protocol and results as ``run_local``.

    Spec problems raise SpecError before any worker starts; an output that cannot be used
    raises DatasetError. Shards that fail after their retries are recorded and reported in the
    result (exit code 1). Dead workers are replaced for as long as the job runs (the result
    counts them); a worker that raises while starting raises WorkerPoolError naming the reason,
    and committed shards are kept (the same command again finishes the job).
    """
    started = time.time()
    return drive_ray(open_job(plan_job(spec), out, started), address, progress)


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


class _Driver:
    """One run of the scheduling loop: hand shards to ready workers (:meth:`dispatch`), wait for
    any shard or worker, and handle what came back (:meth:`on_ready`, :meth:`lost`,
    :meth:`on_failure`)."""

    def __init__(self, job: OpenJob, progress: bool):
        self.job = job
        self.execution = job.plan.spec["execution"]
        self.pool = Pool(job.plan, pool_size(self.execution, len(job.todo), ray.cluster_resources()))
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
            self.lost(i, short_error(e))
            return
        except RayTaskError as e:                      # the shard's computation or write raised
            self.on_failure(shard, i, short_error(e.cause if getattr(e, "cause", None) is not None else e))
        except RayError as e:                          # unreachable (node lost?), ...: its calls' fate is
            self.lost(i, f"{type(e).__name__}: {short_error(e)}", dead=False)   # unknown, so it is replaced
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

