"""Reward-model training throughput (issue 10): is the reader the limit?

A dataset of N rows (default 200 000) of a cheap model (ddpm-gmm2d's x0 prediction, gaussian
(2,) latents) is written through the Dataset writer with the job's real resolved spec and a
synthetic target (the descriptors themselves do not enter the reader or the trainer, so they are
not computed). Then, on this machine, side by side:

- the reader alone: the ok rows' index columns (sample_id, diffusion_t, timestep, target) by
  Parquet column projection (``geomjobs.reward.data.read_index``), rows/s;
- rebuilding latents alone: ``RewardSource.z`` of training batches from the stored spec, rows/s;
- training: ``geomjobs.reward.train.train`` steps with batches rebuilt on the fly (the default
  network, 128 wide), rows/s, after its compile;
- the train step alone on one fixed batch (no data), rows/s.

If the reader and the rebuild each run many times faster than the step, the data path is not the
limit. Run alone:  .venv/bin/python benchmarks/bench_reward_train.py [--rows 200000] (section ``reward_train``
of bench.py)
The machine is shared: the ratios measured side by side are what count.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
from common import machine, table

SMOKE = ["--rows", "3000", "--steps", "4", "--batch-size", "32", "--rounds", "1", "--repeats", "4"]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=200, help="batches of the rebuild and calls of the step timed per round")
    return ap.parse_args(argv)


def spec(rows: int) -> dict:
    return {"model": {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 10, "prediction": "x0"},
            "latents": {"kind": "gaussian", "count": rows, "shape": [2], "seed": 0},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": 10_000, "batch_size": 1000}}


def write_dataset(uri: str, rows: int) -> None:
    """The job's dataset as a run would lay it out, with t ~ U{0..99} and a synthetic psi."""
    from geomjobs.records import records_table
    from geomjobs.runner.job import job_card
    from geomjobs.runner.plan import plan_job
    from geomjobs.sink.dataset import Dataset

    plan = plan_job(spec(rows)).with_output(uri)
    ds = Dataset(uri)
    ds.initialize(plan.spec, job_card(plan), plan.artifacts())
    for shard in range(plan.num_shards):
        ids = plan.shard_ids(shard)
        n = len(ids)
        t = np.random.default_rng([1, shard]).integers(0, 100, n)
        psi = np.sin(ids * 1e-3) + t * 1e-2
        cols = {"sample_id": ids, "shard_id": np.full(n, shard, np.int32), "model_id": ["ddpm-gmm2d"] * n,
                "timestep": t.astype(np.int32), "status": ["ok"] * n, "error": [None] * n,
                "local_scaling": psi, "local_rank": np.full(n, 2.0)}
        ds.commit_shard(shard, records_table(cols, job_metadata={"job_id": plan.job_id, "spec_hash": plan.hash}))


def reader_rate(uri: str) -> float:
    from geomjobs.reward.data import read_index
    from geomjobs.sink.dataset import Dataset

    t = time.perf_counter()
    tab = read_index(Dataset(uri), "local_scaling")
    return tab.num_rows / (time.perf_counter() - t)


def rebuild_rate(uri: str, batch: int, batches: int = 200) -> float:
    from geomjobs.reward.data import open_source

    src = open_source(uri, "local_scaling")
    rng = np.random.default_rng(0)
    rows = [np.sort(rng.choice(len(src.ids), batch, replace=False)) for _ in range(batches)]
    t = time.perf_counter()
    for r in rows:
        src.z(r)
    return batch * batches / (time.perf_counter() - t)


def train_rate(uri: str, out: str, steps: int, batch: int) -> tuple[float, dict]:
    """rows/s of the training loop (batches rebuilt on the fly), as ``train`` times it: the first
    step (its compile) and the held-out evaluations left out."""
    from geomjobs.reward.train import TrainConfig, train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(steps=steps, batch_size=batch, eval_every=steps, val_rows=2000, patience=10**6)
    meta = train([uri], out, config=cfg, resume=False)
    return meta["train_rows_per_s"], meta


def step_rate(batch: int, repeats: int = 200) -> float:
    """rows/s of the jitted train step alone on one fixed batch (the default network, (2,) latents)."""
    import jax
    import jax.numpy as jnp
    import optax

    from geomjobs.sampling import reward_net as rm

    net = rm.build_network((2,), rm.network_config((2,)))
    params = rm.init_params(net)
    tx = optax.adamw(1e-3)
    opt = jax.jit(tx.init)(params)

    @jax.jit
    def step(p, o, z, t, y):
        loss, g = jax.value_and_grad(lambda p: jnp.mean((net.apply({"params": p}, z, t) - y) ** 2))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    z = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 2)), jnp.float32)
    t = jnp.zeros(batch, jnp.float32)
    y = jnp.zeros(batch, jnp.float32)
    params, opt, loss = step(params, opt, z, t, y)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(repeats):
        params, opt, loss = step(params, opt, z, t, y)
    jax.block_until_ready(loss)
    return batch * repeats / (time.perf_counter() - t0)


def measure(rows: int, steps: int, batch: int, rounds: int, repeats: int) -> dict:
    tmp = tempfile.mkdtemp(prefix="gjbench-reward-")
    try:
        uri = f"{tmp}/ds"
        t = time.perf_counter()
        write_dataset(uri, rows)
        written = time.perf_counter() - t
        res = {"reader": [], "rebuild": [], "train": [], "step": []}
        meta = None
        for _ in range(rounds):     # interleaved, so that load on the shared machine hits all alike
            res["reader"].append(reader_rate(uri))
            res["rebuild"].append(rebuild_rate(uri, batch, repeats))
            r, meta = train_rate(uri, f"{tmp}/r", steps, batch)
            res["train"].append(r)
            res["step"].append(step_rate(batch, repeats))
        return {"rows": rows, "write_s": written, "meta": meta, **{k: statistics.median(v) for k, v in res.items()}}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(args) -> str:
    """Markdown: reader, rebuild, training and step rows/s on an ``args.rows``-row dataset."""
    rows, batch, rounds = args.rows, args.batch_size, args.rounds
    r = measure(rows, args.steps, batch, rounds, args.repeats)
    base = r["train"]
    return "\n".join([
        f"### Reward training data path ({r['rows']:,} rows; ddpm-gmm2d spec, gaussian (2,) latents, batch {batch})", "",
        f"Measured by `benchmarks/bench_reward_train.py --rows {rows}` on {machine()}, medians of {rounds} interleaved "
        "rounds; the machine was shared, so the ratios are the figure, not the absolute rates.", "",
        *table(["path", "rows/s", "x training"], [
            ["reader alone: index columns of the ok rows by Parquet column projection", f"{r['reader']:,.0f}",
             f"{r['reader'] / base:,.0f} x"],
            ["latents rebuilt from the stored spec alone (random batches)", f"{r['rebuild']:,.0f}", f"{r['rebuild'] / base:,.1f} x"],
            ["training, batches rebuilt on the fly (prefetched one step ahead)", f"{base:,.0f}", "1.0 x"],
            ["the train step alone on one fixed batch", f"{r['step']:,.0f}", f"{r['step'] / base:,.1f} x"]]),
        "",
        "The reader runs once per training run (the index stays in memory); the rebuild runs for every batch, "
        "on a thread while the previous step trains.",
        f"Index columns in memory: ~20 bytes a row ({r['rows'] * 20 / 2**20:.0f} MiB here, ~20 MiB per million rows); "
        "latents are never held.",
    ])


if __name__ == "__main__":
    print(run(parse(sys.argv[1:])))
