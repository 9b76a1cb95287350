"""Jobs that outlive their workers, on a real Ray cluster (``ray start --head`` on 127.0.0.1):
workers SIGKILLed at random throughout a job (only processes below the head this test process
started), a worker killed while it starts, a shard that kills every worker it touches, a worker
that cannot start (its constructor raises) stopping the job with the reason, a second node lost
mid-job, and SIGTERM (a preemption notice) to a worker mid-shard."""
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from geomjobs import run_job
from geomjobs.errors import WorkerPoolError
from geomjobs.runner.job import open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_connect import worker_start_error
from geomjobs.runner.ray_driver import drive_ray
from geomjobs.sink.dataset import Dataset

from jobs import assert_each_sample_once, mlp_spec, read_sorted, write_mlp
from ray_cluster import WorkerKiller, _title, cli, shared_cluster, slow_spec, worker_processes, write_spec


def test_a_start_error_names_the_exception_and_the_node():
    """What Ray says of a constructor that raised, reduced to the exception's line and the node."""
    text = ("The actor died because of an error raised in its creation task, \x1b[36mray::ShardWorker.__init__()"
            "\x1b[39m (pid=7, ip=10.0.0.7, actor_id=ab12)\n  File \"ray_driver.py\", line 1, in __init__\n"
            "RuntimeError: worker start-up failed:\nTraceback (most recent call last):\n  File \"mlp.py\"\n"
            "geomjobs.errors.SpecError: spec key 'model.weights': weight file 'm.npz' does not exist\n")
    e = worker_start_error(text)
    assert isinstance(e, WorkerPoolError)
    assert str(e).startswith("a worker cannot start on 10.0.0.7: geomjobs.errors.SpecError: spec key "
                             "'model.weights': weight file 'm.npz' does not exist (raised while it started")
    assert "run the same command again" in str(e)


@pytest.fixture(scope="module")
def cluster():
    return shared_cluster()


def committed(out) -> int:
    return len(list(Path(out, "_geomjobs", "shards").glob("*.json")))


def run_under_chaos(cluster, tmp_path, count, kills):
    """A job of a tiny MLP in shards of 20 samples on the cluster's 2 workers while a
    :class:`WorkerKiller` SIGKILLs its workers, ``kills`` times, paced by committed shards (a
    kill every 1 to 0.3 x shards / kills commits: all of them land, on average before a fifth
    of the shards and at the latest before 30 % plus a few commits of lag each, however slow
    the machine) and only until 85 % of the shards are committed, so that no kill races the
    job's end; then the checks every chaos run makes. Returns (result, killer)."""
    w = write_mlp(tmp_path)
    spec = slow_spec(w, count=count, shard_size=20, delay=0.01, batch_size=10)
    spec["execution"]["max_retries"] = 3
    out = tmp_path / "chaos"
    shards = count // 20
    killer = WorkerKiller(cluster.proc.pid, kills, progress=lambda: committed(out),
                          step=(1.0, max(2.0, 0.3 * shards / kills)), keep_going=lambda: committed(out) < 0.85 * shards)
    killer.start()
    t0 = time.time()
    try:
        res = run_job(spec, str(out), address=cluster.address, progress=False)
    finally:
        killer.stop()
    print(f"chaos: {len(killer.killed)} kills landed ({killer.starting} while starting) at {killer.at} of {shards} "
          f"shards committed, {res.worker_deaths} deaths, {res.workers_replaced} replaced, job {time.time() - t0:.1f} s")
    assert res.ok and res.committed_shards == shards and res.failed_shards == [], res
    assert res.worker_deaths >= len(killer.killed)
    df = read_sorted(out)
    assert_each_sample_once(df, count)
    assert (df.status == "ok").all() and df.error.isna().all()
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-{i:06d}.parquet" for i in range(shards)]
    assert not Dataset(str(out)).failures()
    # the same records as an uninterrupted run of the same job by the in-process driver
    # (`geomjobs run`, one worker, in a fresh process as users run it: no x64)
    ref_spec = slow_spec(w, count=count, shard_size=20, delay=0.0, batch_size=10)
    ref_spec["execution"]["workers"] = 1
    cli("run", write_spec(tmp_path, ref_spec), "--out", str(tmp_path / "ref"), "-q", check=True)
    ref = read_sorted(tmp_path / "ref")
    np.testing.assert_array_equal(df.sample_id, ref.sample_id)
    for col in ("local_scaling", "local_rank"):
        np.testing.assert_allclose(df[col], ref[col], rtol=1e-6, err_msg=col)
    return res, killer


def assert_all_landed_mid_job(killer, kills, shards):
    """Every kill landed, each with shards committed before it and after it (the pacing is by
    progress: a slow machine delays the kills, it does not skip them)."""
    assert len(killer.killed) == kills, f"{len(killer.killed)} of {kills} kills landed (at {killer.at} commits)"
    assert all(0 < at < 0.85 * shards for at in killer.at), killer.at


def test_random_worker_kills_throughout_a_job_lose_and_duplicate_nothing(cluster, tmp_path):
    res, killer = run_under_chaos(cluster, tmp_path, count=1600, kills=6)   # the slow variant below: 40 kills
    assert_all_landed_mid_job(killer, 6, 80)


@pytest.mark.slow                      # make test-slow
def test_many_worker_kills_over_a_longer_job(cluster, tmp_path):
    res, killer = run_under_chaos(cluster, tmp_path, count=12000, kills=40)
    assert_all_landed_mid_job(killer, 40, 600)


def test_a_worker_killed_while_starting_is_replaced(cluster, tmp_path):
    """The bug of issue 13: a worker killed while it started was given up for good."""
    w = write_mlp(tmp_path)
    token = tmp_path / "die-at-start"
    spec = slow_spec(w, count=96, shard_size=8, delay=0.05, die_at_start_token=str(token))
    out = str(tmp_path / "out")
    job = open_job(plan_job(spec), out)      # the driver built the model before the token exists
    token.write_text("")
    res = drive_ray(job, cluster.address, progress=False)
    assert Path(str(token) + ".claimed").exists()
    assert res.ok and res.committed_shards == 12 and res.worker_deaths == 1 and res.workers_replaced <= 1
    assert_each_sample_once(read_sorted(out), 96)


def test_a_shard_that_kills_every_worker_it_touches_is_recorded(cluster, tmp_path):
    """Worker deaths are unbounded, attempts per shard are not: the shard holding sample 20
    SIGKILLs each worker that computes it; after max_retries + 1 attempts (each a death) it is
    recorded as failed, and the shards queued behind it on the dying workers are not charged."""
    w = write_mlp(tmp_path)
    z20 = plan_job(slow_spec(w, count=64, shard_size=8, delay=0.0)).latents.latents(np.array([20]))
    spec = slow_spec(w, count=64, shard_size=8, delay=0.0, poison=float(np.asarray(z20).reshape(-1)[0]))
    spec["execution"]["max_retries"] = 1
    out = str(tmp_path / "out")
    res = run_job(spec, out, address=cluster.address, progress=False)
    assert not res.ok and res.failed_shards == [2] and res.committed_shards == 7
    assert res.worker_deaths == 2
    fail = Dataset(out).failures()[2]
    assert fail["attempts"] == 2 and "died" in fail["error"]
    assert sorted(read_sorted(out).sample_id) == [i for i in range(64) if not 16 <= i < 24]


def test_a_worker_that_cannot_start_stops_the_job_with_its_reason(cluster, tmp_path):
    """The model file is gone by the time the workers load it (as on a node that lacks it):
    their constructor raises, which no new worker would change: the job stops at once with the
    reason, instead of replacing workers forever. Fixed, --resume finishes it."""
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=80, shard_size=10)
    out = str(tmp_path / "out")
    job = open_job(plan_job(spec), out)      # the driver has read the weights
    moved = Path(w).rename(tmp_path / "elsewhere.npz")
    t0 = time.time()
    with pytest.raises(WorkerPoolError, match=r"a worker cannot start on [\d.]+: .*weight file .* does not exist"):
        drive_ray(job, cluster.address, progress=False)
    assert time.time() - t0 < 90
    assert not Dataset(out).committed()
    moved.rename(w)
    res = run_job(spec, out, address=cluster.address, progress=False)
    assert res.ok and res.computed_shards == 8 and res.worker_deaths == 0


def when(condition, action, timeout=120.0):
    """A thread that runs ``action()`` once ``condition()`` holds (polled every 50 ms)."""
    def watch():
        t0 = time.time()
        while time.time() - t0 < timeout:
            if condition():
                action()
                return
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    return th


def test_a_node_lost_mid_job_loses_and_duplicates_nothing(cluster, tmp_path):
    """A second node (1 CPU) joins; the job's 3 workers spread over both nodes; once the
    second node's worker is computing, the whole node is SIGKILLed (raylet and workers, as a
    preempted VM). Its shards go to the head's workers, the job completes, each sample once."""
    node = cluster.add_node(num_cpus=1)
    try:
        w = write_mlp(tmp_path)
        spec = slow_spec(w, count=240, shard_size=8, delay=0.1)       # 30 shards of ~0.4 s (0.1 s at each of ~4 model calls)
        spec["execution"]["workers"] = 3
        out = tmp_path / "out"
        on_node = lambda: [p.pid for p in worker_processes(node.pid)]  # noqa: E731
        lost = {}

        def kill_node():
            lost["pids"] = on_node()
            cluster.stop_node(node)
            lost["t"] = time.time()       # each of its processes is dead (SIGKILLed, waited for)

        watcher = when(lambda: committed(out) >= 3 and on_node(), kill_node)
        res = run_job(spec, str(out), address=cluster.address, progress=False)
        watcher.join(5)
    finally:
        cluster.stop_node(node)
    t0 = time.time()
    while cluster.alive_nodes() > 1:      # the next test starts on a cluster that knows the node is gone
        assert time.time() - t0 < 90, "the cluster still counts the lost node as alive"
        time.sleep(1)
    print(f"node loss seen by the cluster {time.time() - lost.get('t', t0):.1f} s after the kill")
    assert lost, "the node was not killed: the job ended first"
    assert res.ok and res.committed_shards == 30 and res.failed_shards == [] and res.worker_deaths >= 1
    assert_each_sample_once(read_sorted(out), 240)
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-{i:06d}.parquet" for i in range(30)]
    marks = Dataset(str(out)).committed()
    assert all(m["committed_at"] < lost["t"] for m in marks.values()
               if int(m["worker"].rsplit(":", 1)[1]) in lost["pids"])   # nothing from the lost node after
    # (a marker stamped while the kill was under way is the node's last work, not a write after it)
    assert not Dataset(str(out)).failures()


def test_sigterm_lets_a_worker_finish_its_shard_then_it_stops(cluster, tmp_path):
    """SIGTERM (a preemption notice) to a worker mid-shard: it commits the shards it had
    started (computing, or written while the next computes), hands back any not started
    (charged nothing), and is stopped once they are back; a fresh worker takes its place."""
    w = write_mlp(tmp_path)
    spec = slow_spec(w, count=160, shard_size=8, delay=0.3)          # 20 shards of ~1.2 s (0.3 s at each of ~4 model calls)
    spec["execution"]["max_retries"] = 0                              # a charged attempt would fail it
    out = tmp_path / "out"
    # a worker running a call (its title names the method: compute, commit); two shards in,
    # with 20 queued, it holds a shard being computed or written
    running = lambda: [p for p in worker_processes(cluster.proc.pid, "ray::ShardWorker.")  # noqa: E731
                       if "__init__" not in _title(p)]
    sent = {}

    def term():
        p = running()[0]
        sent["pid"], sent["t"] = p.pid, time.time()
        p.send_signal(signal.SIGTERM)

    watcher = when(lambda: committed(out) >= 2 and running(), term)
    res = run_job(spec, str(out), address=cluster.address, progress=False)
    watcher.join(5)
    assert sent, "no worker got SIGTERM: the job ended first"
    assert res.ok and res.committed_shards == 20 and res.failed_shards == [] and res.worker_deaths == 1
    marks = Dataset(str(out)).committed()
    by_it = [m for m in marks.values() if m["worker"].endswith(f":{sent['pid']}")]
    assert any(m["committed_at"] > sent["t"] for m in by_it), "its shard was not finished"
    import psutil

    assert not psutil.pid_exists(sent["pid"]) or psutil.Process(sent["pid"]).status() == psutil.STATUS_ZOMBIE
    assert_each_sample_once(read_sorted(out), 160)


def test_the_run_summary_says_how_many_workers_died(cluster, tmp_path):
    w = write_mlp(tmp_path)
    token = tmp_path / "kill-token"
    token.write_text("")                          # the first worker to compute a batch kills itself
    spec = slow_spec(w, count=48, shard_size=8, delay=0.05, kill_token=str(token))
    p = cli("run", write_spec(tmp_path, spec), "--address", cluster.address, "--out", str(tmp_path / "out"), "-q",
            env=cluster.client_env, check=True)
    assert "48/48 rows in 6/6 shards" in p.stdout
    assert re.search(r"1 worker deaths during the job; [01] replacement workers joined it", p.stdout), p.stdout
    assert "died, a new one replaces it (1 worker deaths so far; shard" in p.stderr
