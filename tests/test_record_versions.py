"""Record schema versions: a dataset written in version 1 (before ``cfg_scale``) by the release
at e501131 (tests/data/v1-sampled-ddpm, made by tests/data/make_v1_dataset.py: a sampled-latents
job of 4 shards, interrupted after 2) is read by every reader, resumes in its own version, and
its records are the numbers this release computes."""
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from geomjobs import run_job
from geomjobs.records import SCHEMA_VERSION, as_version, record_schema, records_table
from geomjobs.runner.plan import plan_job
from geomjobs.sink.dataset import Dataset

FIXTURE = Path(__file__).parent / "data" / "v1-sampled-ddpm"
# the spec the fixture's job ran (tests/data/make_v1_dataset.py)
SPEC = {"job_id": "v1-sampled-ddpm",
        "model": {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 10, "prediction": "x0"},
        "latents": {"kind": "sampled", "model": {"kind": "zoo", "name": "ddpm-gmm2d"},
                    "sampler": {"kind": "ddim", "steps": 5}, "count": 8, "seed": 3, "save_latent": True, "batch_size": 4},
        "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
        "execution": {"shard_size": 2, "batch_size": 2}}
V1 = record_schema(1).names


@pytest.fixture
def v1(tmp_path):
    out = tmp_path / "v1"
    shutil.copytree(FIXTURE, out)
    return out


def test_version_2_is_version_1_plus_cfg_scale():
    assert SCHEMA_VERSION == 2
    v2 = record_schema(2)
    assert [n for n in v2.names if n != "cfg_scale"] == V1 and v2.field("cfg_scale").nullable
    t = records_table({"sample_id": [0], "shard_id": [0], "model_id": ["m"], "status": ["ok"], "cfg_scale": [7.5]})
    old = as_version(t, 1)
    assert old.schema.names == V1 and old.schema.metadata[b"geomjobs.schema_version"] == b"1"
    assert as_version(t, 2) is t


def test_every_reader_opens_a_version_1_dataset(v1):
    from geomjobs.analysis import read_ok
    from geomjobs.analysis.io import duckdb_view
    from geomjobs.reward.data import open_source

    ds = Dataset(str(v1))
    assert ds.schema_version() == 1 and sorted(ds.committed()) == [0, 1]
    t = ds.read_table()
    assert t.schema.names == V1 and t.num_rows == 4 and "cfg_scale" not in t.schema.names
    df = read_ok(str(v1))
    assert list(df.sample_id) == [0, 1, 2, 3] and (df.guidance_scale == 0.0).all()
    import duckdb
    con = duckdb.connect()
    duckdb_view(con, "r", str(v1))
    assert con.execute("SELECT count(*) FROM r").fetchall() == [(4,)]
    src = open_source(str(v1), "local_scaling")
    assert list(src.ids) == [0, 1, 2, 3] and src.origin == "z column"
    np.testing.assert_array_equal(src.y, df.local_scaling.to_numpy())


def test_a_version_1_job_resumes_in_version_1_with_this_releases_numbers(v1, tmp_path):
    """The rerun's spec is the stored one (identity and spec_hash as the release computed them), the
    two missing shards are computed and written in version 1, and the records equal a fresh run
    of this release: its shards 0-1 against the release's (the fixture), 2-3 against the resumed."""
    job = Dataset(str(v1)).job()
    assert plan_job(SPEC).hash == job["spec_hash"]
    res = run_job(SPEC, str(v1))
    assert res.ok and res.computed_shards == 2 and res.rows == 8, res
    ds = Dataset(str(v1))
    assert ds.job()["schema_version"] == 1 and ds.job()["spec_hash"] == job["spec_hash"]
    for s in (2, 3):
        f = pq.read_table(v1 / f"part-{s:06d}.parquet")
        assert f.schema.names == V1 and f.schema.metadata[b"geomjobs.schema_version"] == b"1"
        assert f.schema.metadata[b"geomjobs.spec_hash"] == job["spec_hash"].encode()
    resumed = ds.read_table().to_pandas()
    fresh_res = run_job(SPEC, str(tmp_path / "fresh"))
    assert fresh_res.ok
    fresh = Dataset(str(tmp_path / "fresh")).read_table()
    assert fresh.schema.names == record_schema(2).names and fresh.column("cfg_scale").null_count == 8   # no CFG model
    fresh = fresh.to_pandas()
    assert list(resumed.sample_id) == list(fresh.sample_id) == list(range(8))
    for c in V1:
        a, b = resumed[c].to_numpy(), fresh[c].to_numpy()
        if c == "z":
            a, b = np.stack(a), np.stack(b)
        if c in ("z", "local_scaling", "local_rank"):
            # rows 4..7: this release on both sides, bit for bit; rows 0..3: the release at e501131
            # (the fixture) on possibly another CPU, to float32 rounding of the sampler and the SVD
            np.testing.assert_array_equal(a[4:], b[4:], err_msg=c)
            np.testing.assert_allclose(np.asarray(a[:4], float), np.asarray(b[:4], float), rtol=1e-5, atol=1e-6, err_msg=c)
        else:
            assert [str(x) for x in a] == [str(x) for x in b], c


def test_read_table_unifies_files_of_two_versions(v1):
    """Readers never meet two versions in one dataset written by this release (commit_shard keeps
    the dataset's); read_table still unifies them by column name if they do."""
    ds = Dataset(str(v1))
    t = ds.read_table()
    v2 = records_table({**{c: t.column(c).to_pylist()[2:] for c in V1}, "cfg_scale": [7.5, 7.5]})
    pq.write_table(v2, v1 / "part-000001.parquet")      # shard 1 rewritten in version 2 behind commit_shard's back
    both = ds.read_table()
    assert both.column("sample_id").to_pylist() == [0, 1, 2, 3]
    assert both.column("cfg_scale").to_pylist() == [None, None, 7.5, 7.5]
    assert both.drop_columns(["cfg_scale"]).to_pylist() == t.to_pylist()
