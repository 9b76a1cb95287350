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
in /tmp/ray), except for small jobs, which run in process (``run_local``): see
:func:`local_mode`.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import sys
import time
import warnings
from typing import TYPE_CHECKING

from geomjobs.spec import SpecError

if TYPE_CHECKING:   # the heavy imports (jax) happen when a job runs, not when the CLI starts
    from geomjobs.runner.local import JobResult
    from geomjobs.runner.plan import Plan
    from geomjobs.sink.dataset import Dataset

QUEUE_DEPTH = 2            # shards held by one worker: one running, one queued
MAX_RESTARTS = 3           # times Ray restarts one worker process before it is given up
WAIT_TIMEOUT_S = 30.0      # how often the driver reports while nothing finishes
SMALL_JOB_SHARDS = 8       # local mode: at most this many shards to compute ...
SMALL_JOB_SAMPLES = 1024   # ... or this many samples: in process, no Ray
EMBEDDED_OBJECT_STORE = 200 * 1024 * 1024   # the driver moves only commit markers

log = logging.getLogger("geomjobs.ray")


class WorkerPoolError(RuntimeError):
    """No worker could be started or kept alive; committed shards are kept (resume later)."""


# ---- the worker ------------------------------------------------------------------------
class ShardWorker:
    """One long-lived worker: one plan, one engine (one compile), many shards.

    Made a Ray actor by :func:`_worker_class`; plain Python so that it is testable without Ray.
    """

    def __init__(self, spec: dict, spec_hash: str):
        from geomjobs.runner.plan import plan_job
        from geomjobs.runner.engine import Engine
        from geomjobs.sink.dataset import Dataset

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
        from geomjobs.runner.shards import compute_shard

        t0 = time.time()
        table = compute_shard(self.plan, shard, self.engine)
        marker = self.ds.commit_shard(shard, table, worker=self.name, engine=self.engine.describe())
        return {**marker, "seconds": time.time() - t0}


def _node_ip() -> str:
    try:
        import ray

        return ray._private.worker.global_worker.node_ip_address   # the address Ray runs this node on
    except Exception:  # noqa: BLE001 - only a label
        import socket

        return socket.gethostname()


_REMOTE = None


def _worker_class():
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(ShardWorker)
    return _REMOTE


# ---- resources, environment, connection ------------------------------------------------
def worker_resources(execution: dict) -> dict[str, float]:
    """What one worker asks Ray for: ``execution.resources`` with CPU defaulting to 1."""
    res = {k: float(v) for k, v in (execution.get("resources") or {}).items()}
    res.setdefault("CPU", 1.0)
    return res


def actor_options(execution: dict) -> dict:
    res = worker_resources(execution)
    opts = {"num_cpus": res.pop("CPU"), "max_restarts": MAX_RESTARTS, "max_task_retries": 0,
            "scheduling_strategy": "SPREAD", "runtime_env": {"env_vars": worker_env()}}
    if "GPU" in res:
        opts["num_gpus"] = res.pop("GPU")
    if res:
        opts["resources"] = res
    return opts


def worker_env(environ=None) -> dict[str, str]:
    """Environment variables every worker gets (set through its Ray runtime_env).

    JAX preallocates 75 % of an accelerator's memory by default; workers allocate on demand
    unless the driver's environment says otherwise (XLA_PYTHON_CLIENT_MEM_FRACTION / _PREALLOCATE
    are passed through). gcsfs's bucket-type probe is turned off (it stalls for a minute against
    emulators and some proxies). STORAGE_EMULATOR_HOST and GEOMJOBS_MEMORY_BUDGET_GIB (the
    budget of ``chunk: auto``, runner/engine.py) are passed through.
    """
    environ = os.environ if environ is None else environ
    env = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")}
    mem = {k: environ[k] for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                                   "XLA_PYTHON_CLIENT_ALLOCATOR") if k in environ}
    env.update(mem or {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})
    for key in ("STORAGE_EMULATOR_HOST", "GEOMJOBS_MEMORY_BUDGET_GIB"):
        if key in environ:
            env[key] = environ[key]
    return env


def enable_token_auth_if_available() -> bool:
    """Ray >= 2.52 clusters use token authentication. A client that connects to an explicit
    address only sends a token when RAY_AUTH_MODE=token; set it when a token can be found
    (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) and the user has not chosen a
    mode. Returns whether token mode is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:   # a Ray without token authentication
        return False
    return maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def ray_connection(address: str | None, *, num_cpus: int | None = None, num_gpus: int | None = None):
    """Connect to the cluster at ``address`` ("auto" inside a submitted job), or start an
    embedded Ray for this job (address None or "local"). Reuses a connection this process
    already has. Disconnects (and stops an embedded Ray) on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    enable_token_auth_if_available()
    # Ray starts its processes by fork+exec; JAX (imported to plan the job) warns about any fork
    warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
    kw = {"logging_level": logging.WARNING, "log_to_driver": True}
    restore_env: dict[str, str | None] = {}
    if address in (None, "local"):
        restore_env = _ephemeral_token()
        # address="local" always starts a new Ray: never attach to one recorded in /tmp/ray.
        try:
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                     object_store_memory=EMBEDDED_OBJECT_STORE, _node_ip_address="127.0.0.1", **kw)
        except BaseException:
            _restore(restore_env)
            raise
    else:
        if address.startswith(("http://", "https://")):
            raise SpecError("", f"'{address}' is a Jobs API (dashboard) address: use it with `geomjobs submit`; "
                                "`geomjobs run --address` takes the cluster's HOST:PORT (6379 by default) or 'auto'")
        if _is_loopback(address):
            kw["_node_ip_address"] = "127.0.0.1"
        try:
            ray.init(address=address, **kw)
        except (ConnectionError, RuntimeError) as e:   # unreachable, or the token is missing/wrong
            raise WorkerPoolError(f"cannot connect to the Ray cluster at '{address}': {e}") from e
    try:
        yield
    finally:
        ray.shutdown()
        _restore(restore_env)


def _ephemeral_token() -> dict[str, str | None]:
    """An embedded Ray keeps Ray's token authentication on, but when no token exists and no mode
    is chosen it uses a random token for this job only (in the environment its processes
    inherit) instead of writing ~/.ray/auth_token as a bare ``ray.init()`` would. Returns the
    variables to restore afterwards."""
    if os.environ.get("RAY_AUTH_MODE") is not None or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
            return {}
    except ImportError:   # a Ray without token authentication
        return {}
    import secrets

    old = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    os.environ["RAY_AUTH_MODE"] = "token"
    _refresh_auth()
    return old


def _restore(old: dict[str, str | None]) -> None:
    if not old:
        return
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    _refresh_auth()


def _refresh_auth() -> None:
    """Ray caches its auth mode and token per process: make it read the environment again."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:  # noqa: BLE001 - older Ray: nothing cached to refresh
        pass


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
            progress: bool = True, plan: Plan | None = None) -> JobResult:
    """Run a job on the Ray cluster at ``address`` ("auto" inside a Ray job; None or "local":
    an embedded Ray for this job) and wait. Same dataset protocol and results as ``run_local``.

    Spec problems raise SpecError before any worker starts; an output that cannot be used
    raises DatasetError. Shards that fail after their retries are recorded and reported in the
    result (exit code 1); if no worker can be started or kept alive, WorkerPoolError is raised
    and committed shards are kept for ``--resume``.
    """
    from geomjobs.runner.local import open_output, summarize
    from geomjobs.runner.plan import plan_job

    t0 = time.time()
    plan = plan or plan_job(spec)
    ds = open_output(plan, out, resume)
    done = set(ds.committed())
    todo = [s for s in range(plan.num_shards) if s not in done]
    if not todo:
        return summarize(ds, plan, 0, t0)
    execution = plan.spec["execution"]
    num_cpus = num_gpus = None
    if address in (None, "local"):
        per = worker_resources(execution)
        want = execution.get("workers") or 1
        num_cpus = max(os.cpu_count() or 1, math.ceil(want * per["CPU"]))
        num_gpus = None  # detected
    with ray_connection(address, num_cpus=num_cpus, num_gpus=num_gpus):
        computed = _drive(plan, ds, todo, done, progress)
    ds.clean_staging()
    return summarize(ds, plan, computed, t0)


class _Pool:
    """Worker handles and their state: 'starting' (ready() pending), 'ready', 'dead'."""

    def __init__(self, plan: Plan, n: int):

        cls = _worker_class().options(**actor_options(plan.spec["execution"]))
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

    def pick(self, avoid: int | None) -> int | None:
        free = [i for i, s in enumerate(self.state) if s == "ready" and self.load[i] < QUEUE_DEPTH]
        if not free:
            return None
        others = [i for i in free if i != avoid] or free
        return min(others, key=lambda i: self.load[i])

    def kill_all(self) -> None:
        import ray

        for a in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


def _drive(plan: Plan, ds: Dataset, todo: list[int], done: set[int], progress: bool) -> int:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError

    from geomjobs.runner.local import _progress

    execution = plan.spec["execution"]
    n = pool_size(execution, len(todo), ray.cluster_resources())
    retries = execution["max_retries"]
    pool = _Pool(plan, n)
    queue = collections.deque(todo)
    attempts: dict[int, int] = collections.defaultdict(int)
    last_worker: dict[int, int] = {}
    inflight: dict = {}                  # ref -> (shard, worker index)
    computed = 0
    bar = _progress(plan, todo, done, progress)
    waited = 0.0
    try:
        while queue or inflight:
            while queue:
                i = pool.pick(last_worker.get(queue[0]))
                if i is None:
                    break
                shard = queue.popleft()
                inflight[pool.actors[i].run.remote(shard)] = (shard, i)
                pool.load[i] += 1
            if not inflight and not pool.pings:
                raise WorkerPoolError("no worker is alive to compute the remaining shards "
                                      f"({len(queue)} left; committed shards are kept, rerun with --resume). "
                                      + (f"Last worker error: {pool.errors[-1]}" if pool.errors else ""))
            ready, _ = ray.wait(list(inflight) + list(pool.pings), num_returns=1, timeout=WAIT_TIMEOUT_S)
            if not ready:
                waited += WAIT_TIMEOUT_S
                starting = sum(s == "starting" for s in pool.state)
                if not any(s == "ready" for s in pool.state):
                    print(f"geomjobs: waiting {waited:.0f} s for {starting} workers, each asking Ray for "
                          f"{worker_resources(execution)}", file=sys.stderr)
                continue
            waited = 0.0
            ref = ready[0]
            if ref in pool.pings:
                i = pool.pings.pop(ref)
                try:
                    pool.info[i] = ray.get(ref)
                    pool.state[i] = "ready"
                except (RayError, GetTimeoutError) as e:
                    pool.state[i] = "dead"
                    pool.errors.append(_short(e))
                    log.warning("worker %d could not start: %s", i, _short(e))
                continue
            shard, i = inflight.pop(ref)
            pool.load[i] -= 1
            try:
                marker = ray.get(ref)
            except RayTaskError as e:                      # the shard's computation raised
                error = _short(e.cause if getattr(e, "cause", None) is not None else e)
            except RayActorError as e:                     # the worker process died (or vanished)
                error = f"worker {pool.info[i]['worker'] if pool.info[i] else i} died: {_short(e)}"
                pool.ping(i)   # ready again after Ray restarts it, or found dead
            except RayError as e:                          # node lost, object lost, ...
                error = f"{type(e).__name__}: {_short(e)}"
                pool.ping(i)
            else:
                computed += 1
                if bar is not None:
                    bar.update(marker["rows"])
                continue
            attempts[shard] += 1
            last_worker[shard] = i
            if attempts[shard] > retries:
                ds.record_failure(shard, error, attempts[shard])
                log.warning("shard %d failed after %d attempts: %s", shard, attempts[shard], error)
                if bar is not None:
                    bar.update(len(plan.shard_ids(shard)))
            else:
                queue.append(shard)
    finally:
        if bar is not None:
            bar.close()
        pool.kill_all()
    return computed


def _short(e: BaseException, limit: int = 2000) -> str:
    from geomjobs.runner.engine import format_exception

    text = format_exception(e) if not hasattr(e, "error_msg") else str(e)
    return text.strip()[:limit]


# ---- local mode ------------------------------------------------------------------------
def local_mode(plan: Plan, shards_to_do: int) -> str:
    """'process' or 'ray' for a job run with no address.

    In process (``run_local``, no Ray) when the job asks for one worker
    (``execution.workers: 1``), or when it does not say and is small: at most
    ``SMALL_JOB_SHARDS`` shards or ``SMALL_JOB_SAMPLES`` samples left to compute, where starting
    Ray (seconds) would cost more than it gives. Otherwise an embedded Ray runs the cluster
    driver. ``GEOMJOBS_LOCAL_MODE=process|ray`` forces either.
    """
    forced = os.environ.get("GEOMJOBS_LOCAL_MODE", "auto").lower()
    if forced in ("process", "ray"):
        return forced
    workers = plan.spec["execution"].get("workers")
    if workers == 1:
        return "process"
    samples = shards_to_do * plan.shard_size
    if workers is None and (shards_to_do <= SMALL_JOB_SHARDS or samples <= SMALL_JOB_SAMPLES):
        return "process"
    return "ray"


def run_default(spec: dict, out: str | None = None, *, resume: bool = False, progress: bool = True) -> JobResult:
    """What ``geomjobs run`` does without ``--address``: the Ray driver on an embedded Ray, or
    in process for small jobs (see :func:`local_mode`)."""
    from geomjobs.runner.local import run_local
    from geomjobs.runner.plan import plan_job
    from geomjobs.sink.dataset import Dataset

    plan = plan_job(spec)
    uri = out or plan.spec.get("output")
    left = plan.num_shards
    if resume and uri:
        ds = Dataset(uri)
        if ds.exists():
            left -= len(ds.committed())
    if local_mode(plan, left) == "process":
        return run_local(spec, out, resume=resume, progress=progress, plan=plan)
    return run_ray(spec, out, address="local", resume=resume, progress=progress, plan=plan)
