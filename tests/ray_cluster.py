"""Helpers for the Ray and GCS tests: a real Ray cluster on 127.0.0.1 (token auth on, as real
clusters have it), a GCS emulator, and test generators that are slow or kill their worker.

Everything listens on and talks to 127.0.0.1 only. The cluster is started once per test
process (``shared_cluster()``) and stopped at exit by the ids of the processes it started.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# Before ray is imported anywhere in this process: keep every Ray address on loopback.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _kill_tree(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """Stop a process we started, every process below it and its process group (it was started
    in a session of its own), by pid, never by name. ``grace`` seconds after SIGTERM, SIGKILL."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for sig in ([signal.SIGTERM] if grace else []) + [signal.SIGKILL]:
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        _, procs = psutil.wait_procs(procs, timeout=grace or 5)
    proc.wait(timeout=10)


# `ray start` for a worker node on loopback. With RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what keeps
# every Ray address on 127.0.0.1) `ray start --address` refuses to add a node, and with it =1 Ray
# rewrites 127.0.0.1 to the machine's interface address, where the head does not listen: so the
# CLI runs with the variable at 0, its refusal lifted and loopback addresses left as they are.
_WORKER_NODE = ("import sys; import ray._private.ray_constants as c, ray._private.services as s; "
                "c.ENABLE_RAY_CLUSTER = True; s.resolve_ip_for_localhost = lambda host: host; "
                "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


class RayCluster:
    """``ray start --head --block`` on 127.0.0.1 with 2 CPUs, the dashboard (Jobs API) and
    token authentication, in its own temp dir; clients find the token via RAY_AUTH_TOKEN_PATH."""

    def __init__(self, num_cpus: int = 2):
        self.dir = Path(tempfile.mkdtemp(prefix="gjray-", dir="/tmp"))   # short: unix socket paths
        self.token_path = self.dir / "auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        env = {**os.environ, **self.client_env, "JAX_PLATFORMS": "cpu",
               # workers import the test generators below; `python` in a job entrypoint is this venv's
               "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        self.env = env
        self.nodes: list[subprocess.Popen] = []      # nodes added with add_node
        cmd = [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}", f"--num-cpus={num_cpus}",
               "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--ray-client-server-port={free_port()}",
               f"--temp-dir={self.dir / 'ray'}", f"--object-store-memory={200 * 1024 * 1024}"]
        self.log = open(self.dir / "ray-start.log", "wb")
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_port(self.port, 90)
            wait_port(self.dashboard_port, 90)
            self._wait_jobs_api(90)
        except Exception:
            self.stop()
            raise
        self.start_seconds = time.time() - t0

    def _wait_jobs_api(self, timeout: float) -> None:
        import urllib.request

        t0 = time.time()
        req = urllib.request.Request(self.dashboard + "/api/jobs/",
                                     headers={"Authorization": f"Bearer {self.token_path.read_text()}"})
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited: {(self.dir / 'ray-start.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the Ray Jobs API did not come up")

    def apply_client_env(self) -> None:
        """Make this process a client of the cluster (token auth, loopback)."""
        os.environ.update(self.client_env)
        try:   # Ray caches its config: refresh it if ray is already imported
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001
            pass

    def add_node(self, num_cpus: int = 1) -> subprocess.Popen:
        """A second node on loopback (``ray start --address --block``) with its own CPUs; returns
        its process once it has joined. Stop it with ``stop_node`` (SIGKILL of its
        whole tree: the node is lost, as a preempted VM)."""
        log = self.dir / f"node-{len(self.nodes) + 1}.log"
        cmd = [sys.executable, "-c", _WORKER_NODE, "start", "--block", f"--address={self.address}",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
               "--min-worker-port=0", "--max-worker-port=0", f"--object-store-memory={100 * 1024 * 1024}"]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.nodes.append(proc)
        t0 = time.time()
        while "Ray runtime started" not in log.read_text(errors="replace"):   # its raylet has registered
            if proc.poll() is not None or time.time() - t0 > 90:
                self.stop_node(proc)
                raise RuntimeError(f"the node did not start: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
        return proc

    def alive_nodes(self) -> int:
        import ray

        from geomjobs.runner.ray_connect import ray_connection

        with ray_connection(self.address):
            return sum(n["Alive"] for n in ray.nodes())

    def stop_node(self, proc: subprocess.Popen) -> None:
        if proc in self.nodes:
            self.nodes.remove(proc)
            _kill_tree(proc)

    def stop(self) -> None:
        for node in list(self.nodes):
            self.stop_node(node)
        if self.proc is not None:
            _kill_tree(self.proc)
            self.proc = None
            self.log.close()
            shutil.rmtree(self.dir, ignore_errors=True)


_CLUSTER: RayCluster | None = None


def shared_cluster() -> RayCluster:
    """One cluster per test process, stopped at exit."""
    global _CLUSTER
    if _CLUSTER is None:
        _CLUSTER = RayCluster()
        atexit.register(_CLUSTER.stop)
    _CLUSTER.apply_client_env()
    return _CLUSTER


# `gcp-storage-emulator ARGS` with a listen backlog of 256 instead of socketserver's 5: gcsfs sends
# up to 64 requests at once (a dataset's concurrent marker reads and writes), and with a backlog
# of 5 the kernel drops the rest of such a burst, whose clients retry their SYNs after 1, 3, 7 s:
# seconds of stalls at random (test_manifest_scale at 1,500 shards: 9.9 s and no listen-queue
# overflow with 256, 66 s and 1,012 overflows with 5). Real GCS has no such limit. ``patch``: more
# Python run first (gcs_counter's).
def emulator_command(*args: str, patch: str = "") -> list[str]:
    code = ("import sys, http.server; http.server.HTTPServer.request_queue_size = 256; " + patch +
            "from gcp_storage_emulator.__main__ import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-c", code, *args]


class GcsEmulator:
    """``gcp-storage-emulator`` on 127.0.0.1 (in memory) with one bucket."""

    def __init__(self, bucket: str = "geomjobs-test"):
        self.port = free_port()
        self.bucket = bucket
        self.host = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(emulator_command("start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory",
                                                      f"--default-bucket={bucket}"), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, 30)

    def stop(self) -> None:
        if self.proc is not None:
            _kill_tree(self.proc)
            self.proc = None


@contextlib.contextmanager
def serving(emulator):
    """The block runs with STORAGE_EMULATOR_HOST pointing at ``emulator`` (gcsfs reads it; the
    driver passes it on to Ray workers); after it, the variable is restored and the emulator
    (anything with ``host`` and ``stop()``) is stopped."""
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emulator.host
    try:
        yield emulator
    finally:
        emulator.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


# ---- running jobs as users do --------------------------------------------------------------
def cli(*args, env=None, timeout=240, check=False):
    """``python -m geomjobs.cli ARGS`` in a fresh process (no x64, as users run it)."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join([str(TESTS), full.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full.pop("JAX_ENABLE_X64", None)
    p = subprocess.run([sys.executable, "-m", "geomjobs.cli", *args], env=full, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def write_spec(tmp_path, spec, name="spec.yaml"):
    import yaml

    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


# ---- test generators (kind: python, entrypoint ray_cluster:slow_mlp) -------------------------
def slow_spec(weights, count, shard_size, delay, batch_size=8, **faults):
    """A job of :func:`slow_mlp` (``faults``: its kill_token, die_at_start_token, poison)."""
    kwargs = {"weights": weights, "delay": delay, **faults}
    return {"model": {"kind": "python", "entrypoint": "ray_cluster:slow_mlp", "kwargs": kwargs, "latent_shape": [6]},
            "latents": {"kind": "gaussian", "count": count, "shape": [6], "seed": 5},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 5}, "local_rank": {}},
            "execution": {"shard_size": shard_size, "batch_size": batch_size, "max_retries": 2}}


def _claim(token: str) -> bool:
    try:
        os.rename(token, token + ".claimed")   # atomic: exactly one process claims it
        return True
    except OSError:
        return False


def slow_mlp(weights: str, delay: float = 0.0, kill_token: str | None = None, die_at_start_token: str | None = None,
             poison: float | None = None):
    """The MLP of ``weights`` whose every call takes ``delay`` more seconds (a batch's descriptors
    call it a few times: its forward and derivative passes; measured ~4 calls a shard). If the file
    ``kill_token`` exists, the first worker process to run a batch after it appeared claims it and
    kills itself with SIGKILL, mid-shard (a worker process lost, as to the OOM killer). If
    ``die_at_start_token`` exists, the first process to build the model after it appeared claims
    it and kills itself there (a worker lost while it starts). A process that computes a latent
    whose first coordinate is ``poison`` kills itself, every time (a shard that kills every
    worker it touches)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from geomjobs.generators.mlp import load_mlp_weights, mlp_apply

    if die_at_start_token and _claim(die_at_start_token):
        os.kill(os.getpid(), signal.SIGKILL)
    layers = [(jnp.asarray(w), jnp.asarray(b)) for w, b in load_mlp_weights(weights)]

    def pause(z):
        if kill_token and _claim(kill_token):
            os.kill(os.getpid(), signal.SIGKILL)
        if poison is not None and np.isclose(np.asarray(z).reshape(-1, z.shape[-1])[:, 0], poison, rtol=0, atol=1e-6).any():
            # Not at once: the reply of the shard this worker computed just before may still be
            # on its way to the driver, and a process killed within milliseconds of a reply can
            # lose it; the driver then sees two shards on the device and charges the earlier one
            # (ray_driver._Driver.lost). A real worker dies seconds into a shard, not microseconds.
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        if delay:
            time.sleep(delay)

    def apply(params, z):
        jax.debug.callback(pause, z)
        return mlp_apply(params, z)

    return apply, layers


# ---- chaos: SIGKILL the job's workers, only below the head this test process started ----------
def worker_processes(root_pid: int, title: str = "ray::ShardWorker") -> list:
    """Live processes below ``root_pid`` whose process title (Ray sets it to ``ray::Class`` or
    ``ray::Class.method``) starts with ``title``."""
    import psutil

    try:
        below = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in below:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and _title(p).startswith(title):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _title(p) -> str:
    try:
        return (p.cmdline() or [""])[0]
    except Exception:  # noqa: BLE001 - gone meanwhile
        return ""


class WorkerKiller(threading.Thread):
    """SIGKILLs a random worker process below ``root_pid``, ``kills`` times, paced by the job's
    progress rather than by the clock, so that a loaded machine (slow workers, slow start-ups)
    changes when the kills land but not how many land mid-job: kill n + 1 comes once
    ``progress()`` (committed shards, say) has grown by a random step (uniform in ``step``)
    since kill n, and only while ``keep_going()`` holds. Half the kills wait for a worker that
    has started (a replacement still starting would otherwise be the likelier target). ``killed``
    lists the pids of the kills that landed (each a live process, killed once), ``at`` the
    progress when each landed, ``starting`` how many were still in their constructor (title
    ``ray::ShardWorker.__init__``). ``timeout`` only stops a killer whose job has hung."""

    def __init__(self, root_pid: int, kills: int, progress, step=(1.0, 4.0), keep_going=lambda: True,
                 timeout: float = 900.0):
        super().__init__(daemon=True)
        self.root_pid, self.kills, self.progress, self.step = root_pid, kills, progress, step
        self.keep_going, self.timeout = keep_going, timeout
        self.killed: list[int] = []
        self.at: list[float] = []
        self.starting = 0                  # of those, workers killed while starting
        self.done = threading.Event()
        self.rng = random.Random(0)

    def run(self) -> None:
        import psutil

        t0 = time.time()
        target = self.progress() + self.rng.uniform(*self.step)
        want_started = self.rng.random() < 0.5
        while len(self.killed) < self.kills and time.time() - t0 < self.timeout and not self.done.wait(0.05):
            if not self.keep_going():
                break
            now = self.progress()
            if now < target:
                continue
            procs = [p for p in worker_processes(self.root_pid) if p.pid not in self.killed]
            started = [p for p in procs if "__init__" not in _title(p)]
            pool = started if want_started else procs
            if not pool:
                continue                   # wait for one (a started worker, or any)
            p = self.rng.choice(pool)
            try:
                title = _title(p)
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                continue                   # gone meanwhile: choose again
            self.killed.append(p.pid)
            self.at.append(now)
            self.starting += "__init__" in title
            target = now + self.rng.uniform(*self.step)
            want_started = self.rng.random() < 0.5

    def stop(self) -> None:
        self.done.set()
        self.join(10)
