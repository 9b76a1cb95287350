"""The job's Ray workers, one per slot, and their replacement when one dies. The design:
``docs/ray.md``."""
from __future__ import annotations

import contextlib

import ray
from ray.exceptions import RayActorError, RayError

from geomjobs.errors import WorkerPoolError
from geomjobs.runner.job import ShardPlan
from geomjobs.runner.ray_connect import actor_options, worker_start_error
from geomjobs.runner.ray_worker import ShardWorker
from geomjobs.runner.retry import format_exception

QUEUE_DEPTH = 2            # shards held by one worker: one being computed, one being written or queued
WORKER_THREADS = 2 * QUEUE_DEPTH + 2   # a worker's call threads: compute + commit of each shard, ready()
START_DEATHS_LIMIT = 50    # workers in a row dying while starting, none ready between: cannot start


def short_error(e: BaseException, limit: int = 2000) -> str:
    """A Ray error's text (or an exception's type and message), cut to ``limit`` characters."""
    text = format_exception(e) if not hasattr(e, "error_msg") else str(e)
    return text.strip()[:limit]


class Pool:
    """The job's workers, one per slot: 'starting' (its ready() call pending), 'ready', or
    'stopping' (it had SIGTERM: no new shards, replaced once those it holds are back). A dead
    worker is replaced by a fresh actor in its slot (:meth:`replace`), without limit."""

    def __init__(self, plan: ShardPlan, n: int):
        # the actor class is made here, for this job: no Ray handle outlives the connection; the
        # spec is small: passed inline, so a new worker never depends on an object-store copy
        self.cls = ray.remote(ShardWorker).options(**actor_options(plan.spec["execution"]),
                                                   max_concurrency=WORKER_THREADS)
        self.args = (plan.planner, plan.spec, plan.hash)
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
                                      f"ready; the last: {short_error(e, 500)}") from None
            return i, short_error(e)
        except RayError as e:   # ready() raised, an error Ray could not carry, ...
            if self.info[i] is None:                 # while starting: as deterministic
                raise worker_start_error(str(e)) from None
            return i, f"{type(e).__name__}: {short_error(e)}"
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
