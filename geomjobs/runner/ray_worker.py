"""The Ray worker of a job: one long-lived actor holds one plan and one engine (one model load,
one compile) and serves many shards, writing each while it computes the next. The design:
``docs/ray.md``."""
from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable

import ray

from geomjobs.runner.job import ShardPlan
from geomjobs.runner.ray_connect import node_ip
from geomjobs.sink.dataset import Dataset

HANDED_BACK = "handed back"    # a shard's outcome when the worker had SIGTERM before computing it


class ShardWorker:
    """One long-lived worker: one plan, one engine (one compile), many shards.
    ``planner`` rebuilds the driver's plan from its resolved spec (``plan.planner``).

    A shard is two calls, both made when the driver hands it out: :meth:`compute` (the shard's
    ``seq``-th compute on this worker) computes its records and hands them to the worker's
    writer thread, and returns once the shard has left the device; :meth:`commit` returns once
    that write is done, with the commit marker. Computes run one at a time, in ``seq`` order
    (one batch in flight, as in process); the writer writes one shard at a time; so the write
    of shard k overlaps the compute of shard k + 1, as in process (``runner.local``). Made a
    threaded Ray actor by ``ray_pool.Pool`` (its calls run in a pool of threads: a compute waiting
    its turn or a commit waiting for its write blocks only its own thread); plain Python, so
    that it is testable without Ray.
    """

    def __init__(self, planner: Callable[[dict], ShardPlan], spec: dict, spec_hash: str):
        try:
            self.plan = planner(spec)
            if self.plan.hash != spec_hash:
                raise RuntimeError(f"this worker plans the job with spec hash {self.plan.hash[:12]}, the driver "
                                   f"with {spec_hash[:12]}: install the driver's geomjobs version on the cluster")
            self.ds = Dataset(self.plan.spec["output"])
            self.engine = self.plan.make_engine()
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
                "batch_size": getattr(self.engine, "batch_size", None), **self.engine.describe()}

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
                    table = self.engine.compute_shard(shard)
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
