"""Jobs end to end in local mode: records, sharding invariance, resume, per-sample failures."""
import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from geomjobs import run_job
from geomjobs.errors import DatasetError
from geomjobs.generators.mlp import load_mlp_weights, mlp_apply
from geomjobs.geometry.complexity import trace_sites
from geomjobs.latents import build_latents
from geomjobs.records import SCHEMA_VERSION
from geomjobs.runner.engine import Engine
from geomjobs.runner.job import open_job
from geomjobs.runner.plan import plan_job
from geomjobs.runner.shards import compute_shard
from geomjobs.sink.dataset import Dataset

from jobs import assert_each_sample_once, mlp_spec, read_sorted, write_mlp
from references import mlp_flip_counts


def test_records_match_numpy_reference_and_read_back(tmp_path):
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, local_scaling={"mode": "exact", "save_singular_values": True}, local_rank={})
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok and res.exit_code == 0 and res.rows == 40
    df = read_sorted(tmp_path / "out")
    assert_each_sample_once(df, 40)
    assert (df.status == "ok").all() and df.error.isna().all()
    # reference: the same latents, the Jacobian by jax in float64, SVD in numpy
    import jax
    import jax.numpy as jnp
    layers = load_mlp_weights(w)
    z = build_latents(spec["latents"] | {"seed": 3}).latents(np.arange(40))
    for i in (0, 17, 39):
        a = np.asarray(jax.jacfwd(lambda x: mlp_apply(layers, x))(jnp.asarray(z[i])))
        s = np.linalg.svd(a, compute_uv=False)
        # the job runs in float32: its SVD tolerance is float32's, so compare kept values only
        keep = s > s[0] * max(a.shape) * np.finfo(np.float32).eps
        np.testing.assert_allclose(df.local_scaling[i], np.log(s[keep]).sum(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(df.singular_values[i]), s, rtol=1e-4, atol=1e-5)
    # pandas and DuckDB read the dataset as it is, no extra step
    n = duckdb.sql(f"SELECT count(*) FROM '{tmp_path}/out/**/*.parquet' WHERE status = 'ok'").fetchall()[0][0]
    assert n == 40


def test_parquet_files_carry_the_versioned_record_schema(tmp_path):
    res = run_job(mlp_spec(write_mlp(tmp_path)), str(tmp_path / "out"))
    f = sorted((tmp_path / "out").glob("part-*.parquet"))
    assert len(f) == res.num_shards == 3
    schema = pq.read_schema(f[0])
    assert schema.metadata[b"geomjobs.schema_version"] == str(SCHEMA_VERSION).encode() == b"2"
    assert schema.field("cfg_scale").type == "double" and pq.read_table(f[0]).column("cfg_scale").null_count == 16
    assert schema.metadata[b"geomjobs.job_id"] == res.job_id.encode()
    assert schema.field("sample_id").type == "int64" and schema.field("local_complexity").type == "int64"
    art = np.load(tmp_path / "out" / "_artifacts" / "projections.npz")
    assert art["W"].shape == (5, 10)
    np.testing.assert_allclose(art["W"] @ art["W"].T, np.eye(5), atol=1e-12)


@pytest.mark.parametrize("shard_size,batch_size", [(7, 3), (40, 16), (1, 1)])
def test_records_do_not_depend_on_shard_or_batch_size(tmp_path, shard_size, batch_size):
    w = write_mlp(tmp_path)
    base = read_sorted(run_job(mlp_spec(w, shard_size=16, batch_size=8), str(tmp_path / "a")).uri)
    other = read_sorted(run_job(mlp_spec(w, shard_size=shard_size, batch_size=batch_size), str(tmp_path / "b")).uri)
    # float32 batches of different sizes may round differently: ~1e-6 relative
    np.testing.assert_allclose(other.local_scaling, base.local_scaling, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(other.local_rank, base.local_rank, rtol=2e-5)


def test_step_compiles_once_for_many_batches_and_a_padded_tail(tmp_path):
    plan = plan_job(mlp_spec(write_mlp(tmp_path), count=45, shard_size=45, batch_size=8))
    engine = Engine(plan)
    compute_shard(plan, 0, engine)  # 5 full batches + a tail of 5
    assert engine.compiled_count() == 1


def test_resume_after_interruption_writes_every_sample_once(tmp_path, monkeypatch):
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=50, shard_size=10)
    out = str(tmp_path / "out")
    real = Engine.compute_shard
    calls = []

    def dying(engine, shard):
        calls.append(shard)
        if len(calls) == 4:
            raise KeyboardInterrupt  # the process is stopped mid-job
        return real(engine, shard)

    monkeypatch.setattr(Engine, "compute_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        run_job(spec, out)
    assert sorted(Dataset(out).committed()) == [0, 1, 2]
    # a crash between a shard's file and its marker: the file exists, the marker does not
    (tmp_path / "out" / "part-000003.parquet").write_bytes((tmp_path / "out" / "part-000000.parquet").read_bytes())
    assert sorted(Dataset(out).committed()) == [0, 1, 2]
    monkeypatch.setattr(Engine, "compute_shard", lambda engine, shard: (calls.append(shard), real(engine, shard))[1])
    calls.clear()
    res = run_job(spec, out)                        # the same spec again finishes what is missing
    assert sorted(calls) == [3, 4]  # committed shards are never recomputed
    assert res.ok and res.computed_shards == 2
    assert_each_sample_once(read_sorted(out), 50)
    calls.clear()
    assert run_job(spec, out).computed_shards == 0 and calls == []


def test_resume_with_a_different_spec_is_refused(tmp_path):
    w = write_mlp(tmp_path)
    out = str(tmp_path / "out")
    run_job(mlp_spec(w), out)
    changed = mlp_spec(w)
    changed["latents"]["seed"] = 4
    with pytest.raises(DatasetError, match="holds a different job.*latents.seed"):
        run_job(changed, out)
    faster = mlp_spec(w, batch_size=4)  # how a job runs may change on resume
    assert run_job(faster, out).ok


def test_a_failing_sample_is_data_and_the_rest_go_on(tmp_path):
    w = write_mlp(tmp_path)
    lat = tmp_path / "lat.parquet"
    z = np.random.default_rng(0).standard_normal((12, 6))
    z[5, 2] = np.nan
    z[9, 0] = np.inf
    pd.DataFrame({"z": list(z)}).to_parquet(lat)
    spec = mlp_spec(w)
    spec["latents"] = {"kind": "parquet", "uri": str(lat), "column": "z"}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.exit_code == 1 and res.errors == 2 and res.rows == 12
    df = read_sorted(tmp_path / "out")
    assert list(df.index[df.status == "error"]) == [5, 9]
    assert df.error[5] == "latent has non-finite values" and df.local_scaling.isna()[5]
    assert df.local_scaling.drop([5, 9]).notna().all()


def test_a_shard_that_fails_every_attempt_is_recorded_and_the_rest_commit(tmp_path):
    """The retry policy in process: a folder holds shard 1's part-file name, so its commit
    raises on every attempt; after max_retries + 1 attempts the failure is recorded."""
    spec = mlp_spec(write_mlp(tmp_path))            # 40 samples, 3 shards
    spec["execution"]["max_retries"] = 2
    out = tmp_path / "out"
    open_job(plan_job(spec), str(out))              # the dataset, as a run that stopped at once leaves it
    (out / "part-000001.parquet").mkdir()
    (out / "part-000001.parquet" / "blocker").write_text("")
    res = run_job(spec, str(out))
    assert res.exit_code == 1 and res.failed_shards == [1] and res.committed_shards == 2
    assert res.computed_shards == 2 and res.rows == 40 - 16
    s = Dataset(res.uri).summary()
    assert sorted(s.committed) == [0, 2] and s.pending == 0
    assert s.failures[1]["attempts"] == 3 and "part-000001.parquet" in s.failures[1]["error"]


def test_manifest_lists_committed_shards(tmp_path):
    res = run_job(mlp_spec(write_mlp(tmp_path)), str(tmp_path / "out"))
    ds = Dataset(res.uri)
    man = ds.committed()
    assert sorted(man) == [0, 1, 2] and sum(m["rows"] for m in man.values()) == 40
    job = json.loads((tmp_path / "out" / "_geomjobs" / "job.json").read_text())
    assert job["spec_hash"] == plan_job(mlp_spec(write_mlp(tmp_path))).hash
    assert not (tmp_path / "out" / "_staging").exists()


def test_local_complexity_in_a_job_matches_brute_force_sign_counts(tmp_path):
    w = write_mlp(tmp_path, sizes=(6, 32, 32, 32, 10))
    spec = mlp_spec(w, count=12, local_complexity={"directions": 3, "radius": 0.3, "seed": 1, "per_layer": True, "last": 2})
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok
    df = read_sorted(tmp_path / "out")
    B = np.load(tmp_path / "out" / "_artifacts" / "projections.npz")["B"]
    assert B.shape == (3, 6)
    layers = load_mlp_weights(w)
    z = build_latents(spec["latents"]).latents(np.arange(12))
    totals = []
    for i in range(12):
        ref = mlp_flip_counts(layers, z[i], B, 0.3)[-2:]  # last: 2 -> the two last ReLU layers
        assert list(df.local_complexity_per_layer[i]) == ref
        assert df.local_complexity[i] == sum(ref)
        totals.append(sum(ref))
    assert sum(totals) > 0  # the radius is large enough that the check means something
    # the per-layer entries are named in job.json: the last two ReLU sites of the MLP, in order
    sites = json.loads((tmp_path / "out" / "_geomjobs" / "job.json").read_text())["local_complexity_sites"]
    all_sites = trace_sites(lambda x: mlp_apply(layers, x, "relu"), np.zeros(6))
    assert sites == [s.label for s in all_sites[-2:]] and len(all_sites) == 3
    assert df.local_scaling.isna().all()  # psi was not asked for


def test_a_rerun_after_the_shipped_zoo_weights_changed_is_refused(tmp_path, monkeypatch):
    """The job card records a digest of each zoo model's weights file; a rerun of the same spec
    after the shipped weights changed (a retrained model in a new release) must not resume onto
    the old records. The change is made on a copy of the zoo folder, not on the shipped file."""
    import shutil

    from geomjobs.zoo import digest

    spec = {"model": {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 10},
            "latents": {"kind": "gaussian", "count": 8, "shape": [2], "seed": 0},
            "descriptors": {"local_scaling": {"mode": "exact"}}, "execution": {"shard_size": 4}}
    out = str(tmp_path / "out")
    assert run_job(spec, out).ok
    card = Dataset(out).job()
    shipped = (digest.ZOO_DIR / "ddpm_gmm2d.npz").read_bytes()
    assert card["zoo_weights"] == {"ddpm-gmm2d": __import__("hashlib").sha256(shipped).hexdigest()[:16]}
    assert run_job(spec, out).computed_shards == 0            # same weights: the rerun finds it done
    other = tmp_path / "zoo"
    shutil.copytree(digest.ZOO_DIR, other, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (other / "ddpm_gmm2d.npz").write_bytes(shipped + b"\0")    # another file under the same name
    monkeypatch.setattr(digest, "ZOO_DIR", other)
    with pytest.raises(DatasetError, match="other weights of zoo model.*ddpm-gmm2d.*another --out"):
        run_job(spec, out)
    # a card written before the field existed is not checked
    job = json.loads((tmp_path / "out" / "_geomjobs" / "job.json").read_text())
    del job["zoo_weights"]
    (tmp_path / "out" / "_geomjobs" / "job.json").write_text(json.dumps(job))
    assert run_job(spec, out).computed_shards == 0
