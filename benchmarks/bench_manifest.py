"""Resume and inspect at 10,000 and 40,000 shards on the GCS emulator: wall time and requests.

Requests are counted on the wire by the proxy of tests/gcs_counter.py, which pages listings as
GCS does (1,000 objects a page). Markers are written by ``Dataset.write_markers`` (what
``commit_shard`` does after a shard's file is in place; the Parquet files are not written, since
neither operation reads them). Three states of the same dataset, measured one after another on
one emulator:

* before: the manifest read one marker after another (``Dataset.committed_one_by_one``, the
  path before the cache), in resume (``open_job(...)``) and ``geomjobs inspect``;
* after, cache fresh (a job that finished, or whose writers compacted last);
* after, with ``TAIL`` markers newer than the cache (a driver that crashed: each writer
  compacts every ``COMPACT_EVERY`` of its commits, so the tail is at most that per writer).

The emulator is one Python process serving one request at a time on a shared 2-core machine, so
its absolute times say little about GCS (tens of ms a request there, and concurrent); the request
counts carry over, and the ratios between rows measured side by side here are what count.

    .venv/bin/python benchmarks/bench.py --only manifest          # 10,000 and 40,000 shards
    .venv/bin/python benchmarks/bench_manifest.py --sizes 40000   # one size
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

from common import table

TESTS = Path(__file__).resolve().parent.parent / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

SIZES = (10_000, 40_000)
TAIL = 256
SMOKE = ["--sizes", "40", "--tail", "8"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="shards of each dataset")
    ap.add_argument("--tail", type=int, default=TAIL, help="markers newer than the cache (a crashed driver's)")
    return ap.parse_args(argv)


def _markers(start, stop, engine):
    import pyarrow as pa

    from geomjobs.sink.dataset import shard_marker

    out = []
    for shard in range(start, stop):
        table = pa.table({"sample_id": pa.array([shard], pa.int64()), "status": ["ok"]})
        out.append(shard_marker(shard, table, worker=f"ray:w{shard % 3}", engine=engine))
    return out


def _write_tail(uri, ms):
    """Commit ``ms`` through writers that each stay under COMPACT_EVERY commits (no cache write)."""
    import geomjobs.sink.dataset as dsm

    step = dsm.COMPACT_EVERY - 1
    for i in range(0, len(ms), step):
        dsm.Dataset(uri).write_markers(ms[i:i + step])


def _measure(em, fn):
    em.proxy.reset()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, em.proxy.total()


def _ops(spec, uri):
    from geomjobs import cli
    from geomjobs.runner.job import open_job
    from geomjobs.runner.plan import plan_job

    def resume():
        job = open_job(plan_job(spec), uri)
        assert not job.todo[:0]

    def inspect():
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["inspect", uri, "--json"]) == 0

    return {"resume": resume, "inspect": inspect}


class _Rows(list):
    """The table's rows, each also printed to stderr as it is measured (the run is long)."""

    def append(self, row):
        print(row, file=sys.stderr, flush=True)
        super().append(row)


@contextlib.contextmanager
def _one_by_one():
    """Dataset.committed as it was before the cache: each marker read in turn."""
    from geomjobs.sink.dataset import Dataset

    new = Dataset.committed
    Dataset.committed = lambda self, compact=True: self.committed_one_by_one()
    try:
        yield
    finally:
        Dataset.committed = new


def measure(sizes=SIZES, tail: int = TAIL) -> list[dict]:
    from gcs_counter import FastEmulator

    from geomjobs.generators.mlp import random_mlp, save_mlp
    from geomjobs.runner.job import open_job
    from geomjobs.runner.plan import plan_job
    from geomjobs.sink.dataset import Dataset

    from ray_cluster import serving

    engine = {"mode": "projection", "k": 5, "chunk": None, "devices": 1, "xla_memory_bytes": 123456}
    rows = _Rows()
    with serving(FastEmulator("geomjobs-bench")) as em:
        with tempfile.TemporaryDirectory() as tmp:
            w = os.path.join(tmp, "mlp.npz")
            save_mlp(w, random_mlp([6, 24, 24, 10], seed=1))
            for n in sizes:
                spec = {"model": {"kind": "mlp", "weights": w, "activation": "relu"},
                        "latents": {"kind": "gaussian", "count": n, "shape": [6], "seed": 3},
                        "descriptors": {"local_scaling": {"mode": "projection", "k": 5}, "local_rank": {}},
                        "execution": {"shard_size": 1, "batch_size": 1}}
                uri = f"gs://{em.bucket}/manifest-{n}"
                open_job(plan_job(spec), uri)
                ms = _markers(0, n, engine)
                t0 = time.perf_counter()
                Dataset(uri).write_markers(ms[:n - tail])     # one writer; its last compaction covers these
                _write_tail(uri, ms[n - tail:])
                wrote = time.perf_counter() - t0
                ops = _ops(spec, uri)
                with _one_by_one():
                    for op in ("resume", "inspect"):
                        if op == "inspect" and n > sizes[0]:
                            continue      # the same manifest read as resume's; too long to repeat here
                        s, r = _measure(em, ops[op])
                        rows.append({"shards": n, "op": op, "state": "before (one marker at a time)", "s": s, "requests": r})
                for op in ("resume", "inspect"):
                    # resume finds the tail and rewrites the cache; re-create the tail before inspect
                    if op == "inspect":
                        _write_tail(uri, ms[n - tail:])
                    s, r = _measure(em, ops[op])
                    rows.append({"shards": n, "op": op, "state": f"after, {tail} markers newer than the cache", "s": s,
                                 "requests": r})
                    s, r = _measure(em, ops[op])
                    rows.append({"shards": n, "op": op, "state": "after, cache fresh", "s": s, "requests": r})
                rows.append({"shards": n, "op": "write markers", "state": f"{n} through write_markers", "s": wrote,
                             "requests": None})
    return rows


def run(args) -> str:
    if not 0 < args.tail < min(args.sizes):
        raise ValueError(f"--tail must be in 1..{min(args.sizes) - 1} (fewer than the smallest size), got {args.tail}")
    rows = measure(args.sizes, args.tail)
    return "\n".join([
        "Resume (`open_job(...)`) and `geomjobs inspect --json` of a gs:// dataset on the GCS emulator",
        "(`benchmarks/bench_manifest.py`). Requests counted on the wire by a proxy that pages listings as GCS does",
        "(1,000 objects a page); one emulator process serving one request at a time on the shared 2-core machine,",
        "so wall times are loopback-and-Python figures and only the ratios between rows count; request counts",
        "carry over to GCS. 'before' reads each marker in turn (the path before the manifest cache).", "",
        *table(["shards", "operation", "state", "wall s", "requests"],
               [[f"{r['shards']:,}", r["op"], r["state"], f"{r['s']:.2f}", "" if r["requests"] is None else r["requests"]]
                for r in rows]),
    ])


if __name__ == "__main__":
    print(run(parse(sys.argv[1:])))
