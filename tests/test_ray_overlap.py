"""A Ray worker writes shard k while it computes shard k + 1 (as the in-process driver does),
and a shard's reply to the driver still means "committed". First the worker alone, in this
process (its calls made as Ray makes them, from several threads), where a write is held until
the next compute has started, so that a serial worker cannot pass; then a job on a real local
Ray cluster, whose replies' timelines show the overlap and that computes never overlap."""
import collections
import threading
from pathlib import Path

import pytest

from geomjobs.runner import ray_driver
from geomjobs.runner.engine import Engine
from geomjobs.runner.job import open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_driver import drive_ray
from geomjobs.runner.ray_worker import ShardWorker
from geomjobs.sink.dataset import Dataset

from jobs import assert_each_sample_once, mlp_spec, read_sorted, write_mlp
from ray_cluster import shared_cluster, slow_spec

HANG = 60.0     # seconds a step waits for the other before the test calls it a deadlock


def in_thread(fn, *args):
    """Run ``fn(*args)`` in a thread (as Ray runs a threaded actor's calls); returns a getter."""
    out = {}

    def call():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the getter
            out["error"] = e

    th = threading.Thread(target=call, daemon=True)
    th.start()

    def get():
        th.join(HANG)
        assert not th.is_alive(), f"{fn.__name__}{args} did not return"
        if "error" in out:
            raise out["error"]
        return out["value"]

    return get


@pytest.fixture
def worker(tmp_path, monkeypatch):
    """A ShardWorker of a 5-shard job; ``worker.log`` lists ('start'|'end', shard) of its
    computes, ``worker.computing`` the most computes seen at once."""
    spec = mlp_spec(write_mlp(tmp_path), count=40, shard_size=8)
    job = open_job(plan_job(spec), str(tmp_path / "out"), False)
    w = ShardWorker(job.plan.planner, job.plan.spec, job.plan.hash)
    w.log, w.computing, now = [], 0, [0]
    real = Engine.compute_shard
    lock = threading.Lock()

    def compute_shard(engine, shard):
        with lock:
            now[0] += 1
            w.computing = max(w.computing, now[0])
            w.log.append(("start", shard))
        try:
            return real(engine, shard)
        finally:
            with lock:
                now[0] -= 1
                w.log.append(("end", shard))

    monkeypatch.setattr(Engine, "compute_shard", compute_shard)
    w.out = tmp_path / "out"
    return w


def test_a_worker_writes_a_shard_while_it_computes_the_next(worker, monkeypatch):
    """Shard 0's write does not finish until shard 1's compute has started: a worker that
    computed the next shard only after committing the previous one would hang here."""
    next_started = threading.Event()
    real_commit = worker.ds.commit_shard

    def commit_shard(shard, table, **kw):
        if shard == 0:
            assert next_started.wait(HANG), "shard 1 was not being computed while shard 0 was written"
            assert not Path(worker.out, "_geomjobs/shards/000000.json").exists()
        return real_commit(shard, table, **kw)

    worker.ds.commit_shard = commit_shard
    real_compute = Engine.compute_shard

    def compute_shard(engine, shard):
        if shard == 1:
            next_started.set()
        return real_compute(engine, shard)

    monkeypatch.setattr(Engine, "compute_shard", compute_shard)
    commit0 = in_thread(worker.commit, 0, 0)       # the driver makes all four calls at once
    assert worker.compute(0, 0) == {"shard": 0, "seq": 0, "computed": True, "handed_back": False}
    commit1 = in_thread(worker.commit, 1, 1)
    assert worker.compute(1, 1)["computed"]
    first = commit0()
    # the reply means committed: the marker is in the dataset when commit() returns
    assert Dataset(str(worker.out)).committed()[0]["rows"] == first["rows"] == 8
    second = commit1()
    t0, t1 = first["timeline"], second["timeline"]
    assert t0["compute"][1] <= t0["write"][0] and t1["compute"][0] < t0["write"][1]   # the overlap
    assert t0["compute"][1] <= t1["compute"][0]                                       # one compute at a time
    assert worker.log == [("start", 0), ("end", 0), ("start", 1), ("end", 1)] and worker.computing == 1
    assert not first["stopping"] and sorted(Dataset(str(worker.out)).committed()) == [0, 1]


def test_computes_run_one_at_a_time_in_the_order_handed_out(worker):
    """Calls may reach a threaded actor in any order: computes still run one at a time, in
    the order the driver numbered them, and each commit waits for its own shard."""
    late = [in_thread(worker.compute, shard, seq) for shard, seq in [(4, 2), (2, 1)]]
    commits = [in_thread(worker.commit, shard, seq) for shard, seq in [(4, 2), (3, 0), (2, 1)]]
    assert worker.compute(3, 0)["computed"]
    assert [get()["computed"] for get in late] == [True, True]
    assert [get()["shard"] for get in commits] == [4, 3, 2]
    assert worker.log == [("start", 3), ("end", 3), ("start", 2), ("end", 2), ("start", 4), ("end", 4)]
    assert worker.computing == 1
    assert sorted(Dataset(str(worker.out)).committed()) == [2, 3, 4]


def test_after_sigterm_a_worker_hands_back_the_shards_not_started(worker):
    worker.compute(0, 0)
    worker.stopping = True                       # what the SIGTERM handler sets
    assert worker.compute(1, 1) == {"shard": 1, "seq": 1, "computed": False, "handed_back": True}
    assert worker.commit(1, 1) == {"shard": 1, "handed_back": True}
    assert worker.commit(0, 0)["stopping"] is True          # the shard it had started is committed
    assert sorted(Dataset(str(worker.out)).committed()) == [0] and worker.active == 0


def test_a_shard_whose_compute_raises_fails_its_commit_and_not_the_next(worker, monkeypatch):
    real = Engine.compute_shard

    def compute_shard(engine, shard):
        if shard == 0:
            raise ValueError("poison shard 0")
        return real(engine, shard)

    monkeypatch.setattr(Engine, "compute_shard", compute_shard)
    assert worker.compute(0, 0)["computed"] is False
    with pytest.raises(ValueError, match="poison shard 0"):
        worker.commit(0, 0)
    worker.compute(1, 1)
    assert worker.commit(1, 1)["shard"] == 1 and worker.active == 0


# ---- on a real cluster ------------------------------------------------------------------
def test_on_a_cluster_each_worker_writes_while_it_computes_the_next_shard(tmp_path, monkeypatch):
    """Every reply the driver counts as committed has its marker in the dataset already; per
    worker, computes never overlap, each write follows its own compute, and the next shard's
    compute starts before the previous shard's write ends (the serial worker: never)."""
    cluster = shared_cluster()
    out = tmp_path / "out"
    replies = []
    real = ray_driver._Driver.committed

    def committed(self, reply):
        if not reply.get("handed_back"):
            replies.append(reply)
            assert Path(out, "_geomjobs/shards", f"{reply['shard']:06d}.json").exists(), reply
        return real(self, reply)

    monkeypatch.setattr(ray_driver._Driver, "committed", committed)
    w = write_mlp(tmp_path)
    spec = slow_spec(w, count=160, shard_size=8, delay=0.02)        # 20 shards of one batch each
    res = drive_ray(open_job(plan_job(spec), str(out), False), cluster.address, progress=False)
    assert res.ok and res.committed_shards == 20 and len(replies) == 20
    assert_each_sample_once(read_sorted(out), 160)
    by_worker = collections.defaultdict(list)
    for r in replies:
        by_worker[r["timeline"]["worker"]].append(r["timeline"])
    overlapped = pairs = 0
    for timelines in by_worker.values():
        timelines.sort(key=lambda t: t["seq"])
        for t in timelines:
            assert t["compute"][0] <= t["compute"][1] <= t["write"][0] <= t["write"][1]
        for a, b in zip(timelines, timelines[1:]):
            assert b["seq"] == a["seq"] + 1 and a["compute"][1] <= b["compute"][0]   # one compute at a time
            pairs += 1
            overlapped += b["compute"][0] < a["write"][1]
    print(f"{overlapped} of {pairs} consecutive shard pairs overlapped write and compute, "
          f"{len(by_worker)} workers")
    assert overlapped >= 1
