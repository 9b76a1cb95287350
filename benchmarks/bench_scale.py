"""A million latents end to end (issue 13, item 5): the whole job's samples/s against the engine
alone on the same batches (the pipeline efficiency), in process and on a local Ray cluster
(``ray start --head`` on 127.0.0.1 with 2 CPUs, tests/ray_cluster.py), the driver's memory
across the run, the output files' size, and where the time outside the engine goes (each stage
of a shard timed alone). The manifest figures are the section ``manifest`` (bench_manifest.py).

The engine alone is ``Engine.compute`` on the latents of the job's first shards, made
beforehand (so it is the job's own batches, with the host-side cast and padding the job pays);
it is measured before and after the jobs and the median is used. The machine is shared: the
ratios measured side by side are the figures to read.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# Before ray is imported: keep every Ray address on loopback (as tests/conftest.py does); a ray
# imported earlier in this process (another section) gets the same setting below.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import numpy as np
import psutil

from geomjobs.generators.mlp import random_mlp, save_mlp
from geomjobs.runner import shards as shards_module
from geomjobs.runner.engine import Engine
from geomjobs.runner.job import open_job
from geomjobs.runner.local import blas_threads, drive_local
from geomjobs.runner.plan import plan_job
from geomjobs.sink.dataset import Dataset

TESTS = Path(__file__).resolve().parent.parent / "tests"
SMOKE = ["--count", "400", "--shard", "100", "--batch", "50", "--engine-shards", "2", "--skip-cluster"]


def job_spec(weights: str, count: int, shard: int, batch: int, workers: int | None = None) -> dict:
    spec = {"model": {"kind": "mlp", "weights": weights, "activation": "relu"},
            "latents": {"kind": "gaussian", "count": count, "shape": [8], "seed": 0},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": shard, "batch_size": batch}}
    if workers:
        spec["execution"]["workers"] = workers
    return spec


class RssSampler(threading.Thread):
    """This process's resident memory every ``every`` seconds while a job runs."""

    def __init__(self, every: float = 0.25):
        super().__init__(daemon=True)
        self.every, self.proc, self.samples = every, psutil.Process(), []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append(self.proc.memory_info().rss)
            self.stop_event.wait(self.every)

    def stop(self) -> list[int]:
        self.stop_event.set()
        self.join()
        return self.samples


def engine_rate(plan, engine, latents: list) -> float:
    """Samples/s of the engine alone over the given shards' latents (made beforehand)."""
    with blas_threads(plan.spec["execution"]):
        t = time.perf_counter()
        for z in latents:
            engine.compute(z)
        return sum(len(z) for z in latents) / (time.perf_counter() - t)


def stage_costs(plan, engine, tmp: str, shards: list[int]) -> dict[str, float]:
    """Microseconds per sample of each stage of a shard, timed alone (medians over ``shards``)."""
    ds = Dataset(os.path.join(tmp, "stages"))
    ds.initialize(plan.spec, {"job_id": "stages"}, {})
    out: dict[str, list[float]] = {k: [] for k in ("latents", "latents_loop", "engine", "table", "write")}
    for s in shards:
        ids = plan.shard_ids(s)
        t = time.perf_counter()
        z = plan.latents.latents(ids)
        out["latents"].append(time.perf_counter() - t)
        t = time.perf_counter()
        np.stack([np.random.default_rng([0, int(i)]).standard_normal((8,)) for i in ids])   # the former per-sample loop
        out["latents_loop"].append(time.perf_counter() - t)
        t = time.perf_counter()
        res, errors = engine.compute(z)
        out["engine"].append(time.perf_counter() - t)
        t = time.perf_counter()
        table = shards_module.shard_table(plan, s, ids, res, errors, None)
        out["table"].append(time.perf_counter() - t)
        t = time.perf_counter()
        ds.commit_shard(s, table, worker="bench", engine=engine.describe())
        out["write"].append(time.perf_counter() - t)
    n = plan.shard_size
    return {k: statistics.median(v) / n * 1e6 for k, v in out.items()}


def measure_job(run, count: int) -> dict:
    rss = RssSampler()
    rss.start()
    t = time.perf_counter()
    res = run()
    wall = time.perf_counter() - t
    samples = rss.stop()
    if not res.ok:
        raise RuntimeError(f"job failed: {res}")
    marks = sorted(Dataset(res.uri).committed().values(), key=lambda m: m["committed_at"])
    span = marks[-1]["committed_at"] - marks[0]["committed_at"]
    files = [os.path.getsize(os.path.join(res.uri, m["file"])) for m in marks]
    tenth = max(1, len(samples) // 10)
    return {"wall": wall, "sps": count / wall, "steady": sum(m["rows"] for m in marks[1:]) / span,
            "rss_start": samples[0] if samples else 0, "rss_max": max(samples, default=0),
            "rss_first": statistics.median(samples[:tenth]) if samples else 0,
            "rss_last": statistics.median(samples[-tenth:]) if samples else 0,
            "file_mean": statistics.mean(files), "shards": len(marks)}


def run(args) -> str:
    tmp = tempfile.mkdtemp(prefix="geomjobs-bench-scale-")
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp: str) -> str:
    w = os.path.join(tmp, "mlp.npz")
    save_mlp(w, random_mlp([8, 32, 32, 16], seed=0))
    spec = job_spec(w, args.count, args.shard, args.batch)
    plan = plan_job(spec)
    engine = Engine(plan)
    sample_shards = list(range(min(args.engine_shards, plan.num_shards)))
    latents = [plan.latents.latents(plan.shard_ids(s)) for s in sample_shards]
    engine.compute(latents[0][: args.batch])
    rates = [engine_rate(plan, engine, latents)]
    stages = stage_costs(plan, engine, tmp, sample_shards[:3])
    jobs: dict[str, dict] = {}
    jobs["in process"] = measure_job(lambda: drive_local(open_job(plan_job(job_spec(w, args.count, args.shard, args.batch, 1)),
                                                                  os.path.join(tmp, "local"), False), progress=False),
                                     args.count)
    rates.append(engine_rate(plan, engine, latents))
    if not args.skip_cluster:
        sys.path.insert(0, str(TESTS))
        import ray._private.ray_constants as ray_constants

        from geomjobs.runner.ray_driver import drive_ray

        from ray_cluster import RayCluster

        ray_constants.ENABLE_RAY_CLUSTER = False

        previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # stop the cluster on SIGTERM too
        cluster = RayCluster(num_cpus=2)
        try:
            cluster.apply_client_env()
            for n in args.workers:
                out = os.path.join(tmp, f"cluster-{n}")
                jobs[f"local cluster, {n} worker{'s' if n > 1 else ''}"] = measure_job(
                    lambda n=n, out=out: drive_ray(open_job(plan_job(job_spec(w, args.count, args.shard, args.batch, n)),
                                                            out, False), cluster.address, progress=False), args.count)
                rates.append(engine_rate(plan, engine, latents))
        finally:
            cluster.stop()
            signal.signal(signal.SIGTERM, previous)
    eng = statistics.median(rates)
    mib = 2**20
    lines = [
        f"Job: {args.count:,} samples of an MLP 8 -> 32 -> 32 -> 16 (ReLU, float32), psi + nu exact, Gaussian latents, "
        f"shards of {args.shard:,}, batches of {args.batch}. Engine alone: `Engine.compute` on the latents of the job's "
        f"first {len(sample_shards)} shards, made beforehand: {eng:,.0f} samples/s (median of {len(rates)} measurements "
        f"between the jobs: {', '.join(f'{r:,.0f}' for r in rates)}). Whole job: samples / wall time of the driver call "
        "(plan, compile, Ray start-up of the workers, every shard, manifest); steady: between the first and last commit. "
        "The cluster is `ray start --head` on 127.0.0.1 with 2 CPUs, started for the run; its workers share the "
        "2 cores with the driver and the other engineers' work, so the 2-worker row is about scaling, not efficiency.", "",
        "| path | whole job, s | samples/s | steady samples/s | vs engine alone | driver RSS first/last tenth, max (MiB) | "
        "files | mean file |", "|---|---|---|---|---|---|---|---|"]
    for name, j in jobs.items():
        lines.append(f"| {name} | {j['wall']:.1f} | {j['sps']:,.0f} | {j['steady']:,.0f} | {j['sps'] / eng:.2f} "
                     f"(steady {j['steady'] / eng:.2f}) | {j['rss_first'] / mib:.0f} / {j['rss_last'] / mib:.0f}, "
                     f"{j['rss_max'] / mib:.0f} | {j['shards']} | {j['file_mean'] / 1024:.0f} KiB "
                     f"({j['file_mean'] / args.shard:.1f} B/row) |")
    total = sum(v for k, v in stages.items() if k != "latents_loop")
    lines += ["", "Each stage of a shard timed alone (microseconds per sample, medians over 3 shards; in a job the "
                  "latents of the next chunk are made while the engine runs, and in process the Parquet write of a "
                  "shard overlaps the next shard's computation):", "",
              "| stage | us/sample | share of the serial sum |", "|---|---|---|"]
    names = {"latents": "Gaussian latents (seeding and draws vectorised, `latents/streams.py`)", "engine": "engine (the step, batches)",
             "table": "record columns -> Arrow table", "write": "Parquet (zstd) + commit marker"}
    for k, label in names.items():
        lines.append(f"| {label} | {stages[k]:.2f} | {stages[k] / total:.0%} |")
    lines.append(f"| (the former loop: `default_rng([seed, i])` one sample at a time) | {stages['latents_loop']:.2f} | |")
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--shard", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--engine-shards", type=int, default=10, help="shards whose latents time the engine alone")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="cluster runs: workers of each")
    ap.add_argument("--skip-cluster", action="store_true")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
