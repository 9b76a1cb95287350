"""Large jobs (issue 13, item 5), bounded: the vectorised per-sample streams draw numpy's exact
values; a shard computed with its latents made ahead in chunks equals the one-pass shard; the
array-built record columns equal the per-record construction; and a 40,000-sample job in small
shards, in process and on a real local Ray cluster, writes every sample once while the driver's
memory does not grow with the number of shards (two shard counts compared). No timing here:
throughput is benchmarks/bench_scale.py's."""
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest

from geomjobs.latents import streams
from geomjobs.latents.sources import Gaussian
from geomjobs.latents.streams import per_sample_normal
from geomjobs.runner import job as job_module
from geomjobs.runner import shards
from geomjobs.runner.engine import Engine
from geomjobs.runner.job import open_job
from geomjobs.runner.local import drive_local
from geomjobs.runner.plan import plan_job
from geomjobs.runner.ray_driver import drive_ray

from jobs import assert_each_sample_once, mlp_spec, read_sorted, write_mlp
from ray_cluster import shared_cluster


# ---- the streams ------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 3, 2**31 + 7, 2**32 - 1, 2**32, 2**40 + 1])
def test_per_sample_normal_is_default_rng_bit_for_bit(seed):
    rng = np.random.default_rng(11)
    ids = np.concatenate([np.arange(50), rng.integers(0, 2**32, 50), [2**32 - 1, 2**32, 2**33 + 5, 2**62]])
    for shape in [(6,), (2, 3, 4), (1,)]:
        ref = np.stack([np.random.default_rng([seed, int(i)]).standard_normal(shape) for i in ids])
        got = per_sample_normal(seed, ids, shape)
        assert got.shape == (len(ids), *shape) and got.dtype == np.float64
        np.testing.assert_array_equal(got, ref)   # exact: the same PCG64 states, the same draws
    assert per_sample_normal(seed, np.zeros(0, np.int64), (3,)).shape == (0, 3)


def test_the_vectorised_draws_are_active_and_mix_with_the_per_sample_redraws():
    # the tables read from numpy must pass the self-check, else only the slow path is tested above
    consts = streams._constants()
    assert consts is not None
    ids = np.arange(3000)
    drawn = streams._vector_normal(streams._states(streams._pools(
        np.stack([np.zeros(3000, np.uint32), ids.astype(np.uint32)], 1)), 4), 8, consts)
    slow = np.isnan(drawn).any(axis=1)
    # ~0.7-1.5 % of numpy's ziggurat draws leave the fast path, so with 8 draws per sample some
    # (but few) samples are redrawn one by one; both kinds must equal default_rng
    assert 0 < slow.sum() < 0.25 * len(ids)
    ref = np.stack([np.random.default_rng([0, int(i)]).standard_normal(8) for i in ids])
    np.testing.assert_array_equal(drawn[~slow], ref[~slow])
    np.testing.assert_array_equal(per_sample_normal(0, ids, (8,)), ref)
    wide = (streams.VECTOR_DRAWS_MAX + 1,)      # past the vectorised size: the per-sample path alone
    np.testing.assert_array_equal(per_sample_normal(4, ids[:20], wide),
                                  np.stack([np.random.default_rng([4, int(i)]).standard_normal(wide) for i in ids[:20]]))


def test_gaussian_latents_are_the_per_sample_generators_scaled():
    src = Gaussian(1000, (2, 3), seed=9, scale=0.25)
    ids = np.array([999, 0, 17, 17, 512])
    ref = np.stack([np.random.default_rng([9, int(i)]).standard_normal((2, 3)) * 0.25 for i in ids])
    np.testing.assert_array_equal(src.latents(ids), ref)


# ---- one shard ---------------------------------------------------------------------------
def test_a_shard_made_in_prefetched_chunks_equals_the_one_pass_shard(tmp_path, monkeypatch):
    spec = mlp_spec(write_mlp(tmp_path), count=100, shard_size=100, batch_size=8)
    spec["descriptors"]["local_complexity"] = {"per_layer": True}
    plan = plan_job(spec)
    engine = Engine(plan)
    monkeypatch.setattr(shards, "PREFETCH_SAMPLES", 10**9)
    whole = shards.compute_shard(plan, 0, engine)
    monkeypatch.setattr(shards, "PREFETCH_SAMPLES", 16)     # chunks of 2 batches, the tail a partial batch
    chunked = shards.compute_shard(plan, 0, engine)
    assert chunked.equals(whole) and chunked.num_rows == 100


def test_array_built_columns_equal_the_per_record_construction(tmp_path):
    spec = mlp_spec(write_mlp(tmp_path), count=12, shard_size=12, batch_size=4)
    spec["descriptors"] = {"local_scaling": {"mode": "projection", "k": 5, "save_singular_values": True},
                           "local_rank": {}, "local_complexity": {"per_layer": True}}
    plan = plan_job(spec)
    ids = plan.shard_ids(0)
    z = plan.latents.latents(ids)
    z[[3, 7]] = np.nan                                       # two samples fail: their descriptors are null
    res, errors = Engine(plan).compute(z)
    table = shards.shard_table(plan, 0, ids, res, errors, None)
    ok = [e is None for e in errors]
    assert ok.count(False) == 2
    expected = {"sample_id": ids.tolist(), "shard_id": [0] * 12, "model_id": [plan.generator.model_id] * 12,
                "timestep": [plan.generator.timestep] * 12, "status": ["ok" if o else "error" for o in ok],
                "error": errors,
                "local_scaling": [float(v) if o else None for v, o in zip(res["local_scaling"], ok)],
                "local_rank": [float(v) if o else None for v, o in zip(res["local_rank"], ok)],
                "local_complexity": [int(v) if o else None for v, o in zip(res["local_complexity"], ok)],
                "singular_values": [s.tolist() if o else None for s, o in zip(res["singular_values"], ok)],
                "local_complexity_per_layer": [p.tolist() if o else None
                                               for p, o in zip(res["local_complexity_per_layer"], ok)]}
    for name, values in expected.items():
        assert table.column(name).to_pylist() == values, name
    assert table.column("prompt_id").null_count == 12 and table.schema.field("timestep").type == pa.int32()


# ---- a job of many shards: exactly once, the driver's memory flat ---------------------------
COUNT = 40_000
SHARD_SIZES = (1000, 100)      # 40 and 400 shards of the same samples
PER_SHARD_BYTES = 2048         # what ten times the shards may add per extra shard: a driver keeping a
                               # shard's data (its latents, results or records: >= 6 KB for 100 samples,
                               # Python- or Arrow-allocated) grows faster; the driver's own caches and
                               # allocator warm-up (a few hundred KB, saturating, seen over 1500 shards)
                               # stay below it


def cheap_spec(tmp_path, shard_size, workers=None):
    spec = mlp_spec(write_mlp(tmp_path, sizes=(4, 16, 16, 8)), count=COUNT, shard_size=shard_size, batch_size=100)
    spec["latents"]["shape"] = [4]
    spec["descriptors"] = {"local_scaling": {"mode": "exact"}}
    if workers:
        spec["execution"]["workers"] = workers
    return spec


def driver_growth(monkeypatch, run) -> tuple[float, int]:
    """Bytes the driver process holds at the end of a run more than after its first shard:
    Python's traced memory (numpy included) plus Arrow's memory pool, sampled after each shard
    (Progress.update), end = the median of the last tenth of the samples."""
    samples = np.zeros(COUNT, np.int64)
    seen = [0]
    update = job_module.Progress.update

    def sampled(self, n):
        update(self, n)
        samples[seen[0]] = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()
        seen[0] += 1

    monkeypatch.setattr(job_module.Progress, "update", sampled)
    tracemalloc.start()
    try:
        result = run()
    finally:
        tracemalloc.stop()
    assert result.ok, result
    got = samples[:seen[0]]
    return float(np.median(got[-max(1, len(got) // 10):]) - got[0]), len(got)


@pytest.mark.parametrize("where", ["process", pytest.param("cluster", marks=pytest.mark.slow)])   # cluster: ~30 s more
def test_many_small_shards_write_each_sample_once_and_the_driver_does_not_grow(where, tmp_path, monkeypatch):
    address = shared_cluster().address if where == "cluster" else None
    growth = {}
    for shard_size in SHARD_SIZES:
        (tmp_path / str(shard_size)).mkdir()
        spec = cheap_spec(tmp_path / str(shard_size), shard_size, workers=2 if address else None)
        out = str(tmp_path / f"out-{shard_size}")

        def run(spec=spec, out=out):
            job = open_job(plan_job(spec), out)
            return drive_local(job, progress=False) if address is None else drive_ray(job, address, progress=False)

        growth[shard_size], shards_seen = driver_growth(monkeypatch, run)
        assert shards_seen == COUNT // shard_size
        df = read_sorted(out)
        assert_each_sample_once(df, COUNT)
        assert (df.status == "ok").all() and df.local_scaling.notna().all()
        assert sorted(set(df.shard_id)) == list(range(COUNT // shard_size))
    few, many = (COUNT // s for s in SHARD_SIZES)
    extra = growth[SHARD_SIZES[1]] - growth[SHARD_SIZES[0]]
    assert extra < PER_SHARD_BYTES * (many - few), growth


def test_batches_in_flight_give_each_batch_its_own_results_and_isolate_a_raising_sample(tmp_path):
    # Engine.compute dispatches batch k+1 before fetching batch k: every row must still get its
    # own batch's values (equal to running each padded batch alone), and a batch whose step raises
    # must be retried one sample at a time so that only the culprit fails
    plan = plan_job(mlp_spec(write_mlp(tmp_path), count=20, shard_size=20, batch_size=8))
    engine = Engine(plan)
    z = np.random.default_rng(1).standard_normal((20, plan.generator.latent_dim))
    res, errors = engine.compute(z)
    assert errors == [None] * 20
    for start in range(0, 20, 8):
        zb = z[start:start + 8]
        zb = np.concatenate([zb, np.repeat(zb[:1], 8 - len(zb), 0)])
        alone = engine._run(zb, np.zeros(8, np.int32))
        for k in res:
            np.testing.assert_array_equal(res[k][start:start + 8], alone[k][:len(z[start:start + 8])])
    step = engine._step

    def poisoned(params, arrays, zb, tb):
        if np.any(np.asarray(zb)[:, 0] == 99.0):
            raise RuntimeError("poisoned sample")
        return step(params, arrays, zb, tb)

    engine._step = poisoned
    z2 = z.copy()
    z2[11, 0] = 99.0                                  # in the second batch
    res2, errors2 = engine.compute(z2)
    assert errors2[11] is not None and "poisoned sample" in errors2[11]
    assert [e for i, e in enumerate(errors2) if i != 11] == [None] * 19
    keep = np.arange(20) != 11
    for k in res:
        np.testing.assert_allclose(res2[k][keep], res[k][keep], rtol=1e-6)   # batch 2 rows ran one by one: same step, other batch mates
