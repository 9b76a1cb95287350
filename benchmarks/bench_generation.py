"""Generation as a job (issue 9): the sampler alone, sampled jobs with descriptors, and the cost
of a trajectory record against a plain record on the same latents.

Variants of one comparison run interleaved in rounds; medians and ratios are reported. Run alone:
    .venv/bin/python benchmarks/bench_generation.py [--rounds 3] [--count 256] [--steps 50]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from common import table

MODELS = {  # diffusion model -> the job's descriptor model at a generated latent
    "ldm-digits": {"kind": "zoo", "name": "vae-digits"},
    "dit-digits": {"kind": "zoo", "name": "dit-digits"},
}


SMOKE = ["--rounds", "1", "--count", "4", "--steps", "2", "--models", "ldm-digits"]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps of the sampled jobs")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    return ap.parse_args(argv)


def sampler_rate(name: str, count: int, steps: int) -> float:
    """Samples/s of the jitted DDIM batch sampler alone (after its compile)."""
    import jax

    from geomjobs import sampling
    from geomjobs.generators import build_generator

    gen = build_generator({"kind": "zoo", "name": name})
    run = sampling.batch_sampler(gen.denoiser, sampling.Sampler("ddim", steps, 0.0))
    x = np.stack([sampling.initial_noise(0, i, gen.latent_shape) for i in range(count)]).astype(np.float32)
    jax.block_until_ready(run(gen.params, x, None))
    t = time.perf_counter()
    jax.block_until_ready(run(gen.params, x, None))
    return count / (time.perf_counter() - t)


def job(spec: dict, mode: str, keep: bool = False) -> tuple[float, str]:
    """(wall seconds of a whole job (planning, sampling, descriptors, commits) in local mode, its
    output folder: a new temporary one, removed again unless ``keep``)."""
    import geomjobs

    out = tempfile.mkdtemp(prefix="gjbench-")
    os.environ["GEOMJOBS_LOCAL_MODE"] = mode
    try:
        t = time.perf_counter()
        res = geomjobs.run_job(spec, out)
        wall = time.perf_counter() - t
        if not res.ok:
            raise RuntimeError(f"job failed: {res}")
        return wall, out
    finally:
        os.environ.pop("GEOMJOBS_LOCAL_MODE", None)
        if not keep:
            shutil.rmtree(out, ignore_errors=True)


def sampled_spec(name: str, count: int, steps: int) -> dict:
    return {"model": MODELS[name],
            "latents": {"kind": "sampled", "model": {"kind": "zoo", "name": name},
                        "sampler": {"kind": "ddim", "steps": steps}, "count": count, "seed": 0, "batch_size": 64},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}, "local_complexity": {}},
            "execution": {"shard_size": 64, "batch_size": 64, "workers": 1}}


def trajectory_vs_plain(count: int, rounds: int) -> tuple[float, float, int]:
    """Seconds per record: a trajectory job of ldm-digits (its denoiser at each record's own t)
    against a parquet job of the same states and the same denoiser at one fixed timestep."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    steps = 10
    traj = {"model": {"kind": "zoo", "name": "ldm-digits", "prediction": "x0"},
            "latents": {"kind": "trajectory", "model": {"kind": "zoo", "name": "ldm-digits"},
                        "sampler": {"kind": "ddim", "steps": steps}, "count": count // (steps + 1) + 1, "seed": 0,
                        "save_latent": True},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}, "local_complexity": {}},
            "execution": {"shard_size": 256, "batch_size": 64, "workers": 1}}
    _, out = job(traj, "process", keep=True)
    z = pd.read_parquet(out).sort_values("sample_id").z
    shutil.rmtree(out, ignore_errors=True)
    rows = len(z)
    folder = tempfile.mkdtemp(prefix="gjbench-z-")
    pq.write_table(pa.table({"z": [list(v) for v in z]}), f"{folder}/z.parquet")
    plain = {**traj, "model": {"kind": "zoo", "name": "ldm-digits", "prediction": "x0", "timestep": 500},
             "latents": {"kind": "parquet", "uri": folder, "column": "z"}}
    t_traj, t_plain = [], []
    for _ in range(rounds):
        t_traj.append(job(traj, "process")[0])
        t_plain.append(job(plain, "process")[0])
    shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(t_traj) / rows, statistics.median(t_plain) / rows, rows


def trajectory_sampling(count: int, rounds: int) -> tuple[float, float]:
    """(first, warm) seconds of the trajectory job's latent source producing all its records in a
    fresh source: the first call includes the sampler's compile, the warm one is the sampling."""
    from geomjobs.latents import build_latents
    from geomjobs.spec import validate_spec

    steps = 10
    sec = {"kind": "trajectory", "model": {"kind": "zoo", "name": "ldm-digits"}, "sampler": {"kind": "ddim", "steps": steps},
           "count": count // (steps + 1) + 1, "seed": 0}
    spec = validate_spec({"model": {"kind": "zoo", "name": "ldm-digits", "prediction": "x0"}, "latents": sec,
                          "descriptors": {"local_rank": {}}})
    first, warm = [], []
    for _ in range(rounds):
        src = build_latents(spec["latents"])
        ids = np.arange(src.count)
        t = time.perf_counter()
        src.latents(ids)
        first.append(time.perf_counter() - t)
        src._last, src._edges = (None, None), {}
        t = time.perf_counter()
        src.latents(ids)
        warm.append(time.perf_counter() - t)
    return statistics.median(first), statistics.median(warm)


def run(args) -> str:
    rows = []
    for name in args.models:
        rates, proc, ray_ = [], [], []
        for _ in range(args.rounds):
            rates.append(sampler_rate(name, args.count, args.steps))
            proc.append(args.count / job(sampled_spec(name, args.count, args.steps), "process")[0])
            ray_.append(args.count / job(sampled_spec(name, args.count, args.steps), "ray")[0])
        rows.append([f"{name} (descriptors of {MODELS[name]['name']})", f"{statistics.median(rates):.0f}",
                     f"{statistics.median(proc):.1f}", f"{statistics.median(ray_):.1f}"])
    per_traj, per_plain, n = trajectory_vs_plain(args.count, args.rounds)
    first, warm = trajectory_sampling(args.count, args.rounds)
    lines = ["Command: `.venv/bin/python benchmarks/bench_generation.py` (section `generation` of `make bench`).",
             f"DDIM, {args.steps} steps, eta 0; descriptors psi / nu (exact) and delta (P = 4). Jobs include planning, "
             "compiling, sampling, descriptors and commits; in process unless said.", "",
             *table(["diffusion model", "sampler alone (samples/s)", "sampled + psi/nu/delta in process (samples/s)",
                     "same on embedded Ray, 1 worker, Ray start included (samples/s)"], rows),
             "", f"Trajectory vs plain records (ldm-digits, DDIM 10, {n} records, same states, shards of 256 so one "
                 f"trajectory straddles the boundary): {per_traj * 1e3:.2f} ms per trajectory record against "
                 f"{per_plain * 1e3:.2f} ms per plain record, ratio {per_traj / per_plain:.2f} (target <= 1.2). "
                 f"The difference, {(per_traj - per_plain) * n:.2f} s per job, is the trajectory source: all "
                 f"{n} records' states take {first:.2f} s on first use (the sampler's compile included) and "
                 f"{warm * 1e3:.0f} ms once compiled, i.e. a fixed cost per process, not a per-record one."]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(parse(sys.argv[1:])))
