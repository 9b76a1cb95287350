"""Pipeline overhead of the Ray path: the same job in process (no Ray) and on an embedded Ray
with 1 and 2 workers, in interleaved rounds. Steady-state throughput is read off the commit
markers (samples committed after the first commit / time from first to last commit), so Ray's
start-up (reported separately, as whole-job time) does not hide the per-shard overhead.

In process, the job runs with the BLAS threads a Ray worker gets (``runner.local.blas_threads``:
Ray sets OMP_NUM_THREADS to a worker's CPU count). Without that limit, SciPy's OpenBLAS (the
LAPACK under XLA's SVD) runs one thread per core next to XLA's own threads, and the in-process
path ran at 0.69x one Ray worker on a quiet 2-core machine (issue 8), far less on a busy one."""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

from common import table

from geomjobs.generators.mlp import random_mlp, save_mlp
from geomjobs.runner.local import run_local
from geomjobs.runner.ray_driver import run_ray
from geomjobs.sink.dataset import Dataset

SMOKE = ["--count", "16", "--shard", "8", "--rounds", "1", "--workers", "1", "--mlp", "8-16-8"]


def job(weights: str, d: int, count: int, shard: int, workers: int | None) -> dict:
    spec = {"model": {"kind": "mlp", "weights": weights, "activation": "relu"},
            "latents": {"kind": "gaussian", "count": count, "shape": [d], "seed": 0},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {},
                            "local_complexity": {"directions": 4, "radius": 1e-2}},
            "execution": {"shard_size": shard, "batch_size": 64}}
    if workers:
        spec["execution"]["workers"] = workers
    return spec


def steady(uri: str) -> float:
    """Samples/s between the first and the last commit of a finished job."""
    marks = sorted(Dataset(uri).committed().values(), key=lambda m: m["committed_at"])
    span = marks[-1]["committed_at"] - marks[0]["committed_at"]
    return sum(m["rows"] for m in marks[1:]) / span


def run(args) -> str:
    sizes = [int(x) for x in args.mlp.split("-")]
    tmp = tempfile.mkdtemp(prefix="geomjobs-bench-ray-")
    try:
        w = os.path.join(tmp, "mlp.npz")
        save_mlp(w, random_mlp(sizes, seed=0))
        variants = {"in process (no Ray)": None, **{f"Ray, {n} worker{'s' if n > 1 else ''}": n for n in args.workers}}
        sps = {k: [] for k in variants}
        wall = {k: [] for k in variants}
        shard_s = []
        for r in range(args.rounds):
            for name, workers in variants.items():
                out = os.path.join(tmp, f"{r}-{workers}")
                spec = job(w, sizes[0], args.count, args.shard, workers)
                res = (run_local(spec, out, progress=False) if workers is None
                       else run_ray(spec, out, address="local", progress=False))
                if not res.ok:
                    raise RuntimeError(f"{name}: job failed: {res}")
                s = steady(out)
                sps[name].append(s)
                wall[name].append(res.seconds)
                if workers is None:
                    shard_s.append(args.shard / s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in sps.items()}
    base = med["in process (no Ray)"]
    lines = [f"Job: MLP {' -> '.join(map(str, sizes))} (ReLU), psi + nu exact and delta (P = 4), {args.count} samples in "
             f"shards of {args.shard} (~{statistics.median(shard_s):.2f} s of work each in process), batch 64; medians of "
             f"{args.rounds} interleaved rounds. Ray runs on an embedded single-node Ray started per job.", "",
             *table(["path", "steady samples/s", "vs in process", "whole job, s"],
                    [[k, f"{med[k]:.0f}", f"{med[k] / base:.2f}", f"{statistics.median(wall[k]):.1f}"] for k in variants])]
    if {1, 2} <= set(args.workers):
        lines += ["", f"2 workers / 1 worker: {med['Ray, 2 workers'] / med['Ray, 1 worker']:.2f} x (2 cores shared by both "
                      "workers and XLA's own threads, so well below 2 x is expected here)."]
    lines += ["", "In process the step runs with the BLAS threads a Ray worker gets (`runner.local.blas_threads`, "
                  "as Ray's OMP_NUM_THREADS = the worker's CPUs); without it OpenBLAS's threads (LAPACK in the SVD) "
                  "contend with XLA's and in process ran at 0.69 x one worker (issue 8)."]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=3072)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray runs: workers of each")
    ap.add_argument("--mlp", default="64-1024-1024-1024-256", help="the MLP's sizes d-...-n")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
