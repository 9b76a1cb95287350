"""Connecting to Ray: an existing cluster, or an embedded single-node Ray started for one job;
token authentication; what every worker asks Ray for (resources, options, environment) and
how many workers a job gets.

Nothing here imports Ray at module level, so the CLI (``geomjobs submit``, error handling) can
use it without paying for Ray's import.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings

from geomjobs.errors import SpecError, WorkerPoolError  # WorkerPoolError's home; importable from here as before

EMBEDDED_OBJECT_STORE = 200 * 1024 * 1024   # the driver moves only commit markers


def worker_resources(execution: dict) -> dict[str, float]:
    """What one worker asks Ray for: ``execution.resources`` with CPU defaulting to 1."""
    res = {k: float(v) for k, v in (execution.get("resources") or {}).items()}
    res.setdefault("CPU", 1.0)
    return res


def embedded_cpus(execution: dict) -> int:
    """CPUs an embedded Ray declares: the host's, or enough for ``execution.workers`` workers."""
    want = execution.get("workers") or 1
    return max(os.cpu_count() or 1, math.ceil(want * worker_resources(execution)["CPU"]))


def actor_options(execution: dict) -> dict:
    """Ray actor options of one worker: its resources, SPREAD over nodes, the workers' environment."""
    res = worker_resources(execution)
    # max_restarts 0: the pool replaces a dead worker itself, without limit, and so sees every
    # death (a restart in place would hide one at start-up, while ready() is pending)
    opts = {"num_cpus": res.pop("CPU"), "max_restarts": 0, "max_task_retries": 0,
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


def worker_env(environ=None) -> dict[str, str]:
    """Environment variables every worker gets (set through its Ray runtime_env).

    JAX preallocates 75 % of an accelerator's memory by default; workers allocate on demand
    unless the driver's environment says otherwise (XLA_PYTHON_CLIENT_MEM_FRACTION / _PREALLOCATE
    are passed through). gcsfs's bucket-type probe is turned off unless the driver's environment
    sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (geomjobs.sink.fs turns it off in the filesystems it
    makes; this covers gcsfs used any other way in a worker). STORAGE_EMULATOR_HOST and
    GEOMJOBS_MEMORY_BUDGET_GIB (the budget of ``chunk: auto``, runner/engine.py) are passed through.
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


def worker_start_error(error: str) -> WorkerPoolError:
    """The error of a worker that raised while starting (Ray's text of it): the exception's last
    line, and the node."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = re.search(r"\bip=([^,)\s]+)", text)
    return WorkerPoolError(f"a worker cannot start{' on ' + where.group(1) if where else ''}: "
                           f"{lines[-1] if lines else 'an error'} (raised while it started, so no new worker "
                           "would start either). Committed shards are kept: fix it and run the same command again to finish")


def node_ip() -> str:
    """The address Ray runs this process's node on (a label: the host name when unknown)."""
    import ray

    try:
        return ray._private.worker.global_worker.node_ip_address   # the address Ray runs this node on
    except Exception:  # noqa: BLE001 - only a label
        import socket

        return socket.gethostname()


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
    kw = {"logging_level": logging.WARNING, "log_to_driver": True}
    restore_env: dict[str, str | None] = {}
    if address in (None, "local"):
        restore_env = _ephemeral_token()
        # address="local" always starts a new Ray: never attach to one recorded in /tmp/ray.
        try:
            _init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
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
            _init(address=address, **kw)
        except (ConnectionError, RuntimeError) as e:   # unreachable, or the token is missing/wrong
            raise WorkerPoolError(f"cannot connect to the Ray cluster at '{address}': {e}") from e
    try:
        yield
    finally:
        ray.shutdown()
        _restore(restore_env)


def _init(**kw) -> None:
    """``ray.init``. Ray starts its processes by fork+exec; JAX (imported to plan the job) warns
    about any fork: that warning is silenced for this call only."""
    import ray

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
        ray.init(**kw)


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
