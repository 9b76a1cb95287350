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
import statistics
import sys
import tempfile

from geomjobs.generators.mlp import random_mlp, save_mlp
from geomjobs.runner.local import run_local
from geomjobs.runner.ray_driver import run_ray
from geomjobs.sink.dataset import Dataset


def job(weights: str, count: int, shard: int, workers: int | None) -> dict:
    spec = {"model": {"kind": "mlp", "weights": weights, "activation": "relu"},
            "latents": {"kind": "gaussian", "count": count, "shape": [64], "seed": 0},
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
    tmp = tempfile.mkdtemp(prefix="geomjobs-bench-ray-")
    w = os.path.join(tmp, "mlp.npz")
    save_mlp(w, random_mlp([64, 1024, 1024, 1024, 256], seed=0))
    variants = {"in process (no Ray)": None, "Ray, 1 worker": 1, "Ray, 2 workers": 2}
    sps = {k: [] for k in variants}
    wall = {k: [] for k in variants}
    shard_s = []
    for r in range(args.rounds):
        for name, workers in variants.items():
            out = os.path.join(tmp, f"{r}-{workers}")
            spec = job(w, args.count, args.shard, workers)
            res = (run_local(spec, out, progress=False) if workers is None
                   else run_ray(spec, out, address="local", progress=False))
            assert res.ok, res
            s = steady(out)
            sps[name].append(s)
            wall[name].append(res.seconds)
            if workers is None:
                shard_s.append(args.shard / s)
    med = {k: statistics.median(v) for k, v in sps.items()}
    base = med["in process (no Ray)"]
    one = med["Ray, 1 worker"]
    lines = [f"Job: MLP 64 -> 1024 x 3 -> 256 (ReLU), psi + nu exact and delta (P = 4), {args.count} samples in shards "
             f"of {args.shard} (~{statistics.median(shard_s):.2f} s of work each in process), batch 64; medians of "
             f"{args.rounds} interleaved rounds. Ray runs on an embedded single-node Ray started per job.", "",
             "| path | steady samples/s | vs in process | whole job, s |", "|---|---|---|---|"]
    for k in variants:
        lines.append(f"| {k} | {med[k]:.0f} | {med[k] / base:.2f} | {statistics.median(wall[k]):.1f} |")
    lines += ["", f"2 workers / 1 worker: {med['Ray, 2 workers'] / one:.2f} x (2 cores shared by both workers "
                  "and XLA's own threads, so well below 2 x is expected here).", "",
              "In process the step runs with the BLAS threads a Ray worker gets (`runner.local.blas_threads`, "
              "as Ray's OMP_NUM_THREADS = the worker's CPUs); without it OpenBLAS's threads (LAPACK in the SVD) "
              "contend with XLA's and in process ran at 0.69 x one worker (issue 8)."]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=3072)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
