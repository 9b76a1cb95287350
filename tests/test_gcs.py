"""gs:// outputs through gcsfs, against a GCS emulator on 127.0.0.1: a job on the Ray cluster
writes its shards from the workers, the dataset reads back with pandas and Dataset, and resume
after a crash at any point between a shard's file and its marker writes every sample once."""

import numpy as np
import pandas as pd
import pytest

from geomjobs import run_job
from geomjobs.errors import DatasetError
from geomjobs.runner.local import run_local
from geomjobs.sink.dataset import Dataset

from jobs import assert_each_sample_once, mlp_spec, write_mlp
from ray_cluster import GcsEmulator, serving, shared_cluster


@pytest.fixture(scope="module")
def gcs():
    with serving(GcsEmulator()) as em:     # the driver passes it on to the workers
        yield em


@pytest.fixture(scope="module")
def cluster():
    return shared_cluster()


def read_gs(uri, em):
    # gcsfs caches listings per instance: a fresh, uncached one sees every committed file. The
    # plain GCSFileSystem, as geomjobs uses: gcsfs's default class probes the bucket type over
    # gRPC, which the emulator does not serve (a minute's timeout per read)
    from gcsfs.core import GCSFileSystem

    fs = GCSFileSystem(endpoint_url=em.host, token="anon", use_listings_cache=False, skip_instance_cache=True)
    df = pd.read_parquet(uri.removeprefix("gs://"), filesystem=fs)
    return df.sort_values("sample_id").reset_index(drop=True)


def test_a_cluster_job_to_gcs_reads_back_and_resumes_after_a_crash(gcs, cluster, tmp_path):
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=48, shard_size=8, batch_size=8)
    uri = f"gs://{gcs.bucket}/runs/cluster"
    res = run_job(spec, uri, address=cluster.address)
    assert res.ok and res.uri == uri and res.committed_shards == 6
    df = read_gs(uri, gcs)
    assert_each_sample_once(df, 48)
    ref = run_local(spec, str(tmp_path / "ref"), progress=False)
    ref_df = Dataset(ref.uri).read_table().to_pandas()
    np.testing.assert_allclose(df.local_scaling, ref_df.local_scaling, rtol=1e-6)
    table = Dataset(uri).read_table()
    assert table.num_rows == 48 and table.column("sample_id").to_pylist() == list(range(48))
    ds = Dataset(uri)
    assert all(m["worker"].startswith("ray:") for m in ds.committed().values())
    np.testing.assert_array_equal(ds.artifacts()["W"], np.load(tmp_path / "ref/_artifacts/projections.npz")["W"])

    # crash states: shard 3's file landed but not its marker; shard 4 never started
    for rel in ("_geomjobs/shards/000003.json", "_geomjobs/shards/000004.json", "part-000004.parquet"):
        ds.fs.rm(f"{ds.root}/{rel}")
    before = ds.committed()
    assert sorted(before) == [0, 1, 2, 5]
    changed = mlp_spec(w, count=48, shard_size=8)
    changed["latents"]["seed"] = 9
    with pytest.raises(DatasetError, match="latents.seed"):
        run_job(changed, uri, address=cluster.address)
    res = run_job(spec, uri, address=cluster.address)
    assert res.ok and res.computed_shards == 2
    after = Dataset(uri).committed()
    assert all(after[s] == m for s, m in before.items())   # committed shards untouched
    assert_each_sample_once(read_gs(uri, gcs), 48)
    files = sorted(p.rsplit("/", 1)[-1] for p in ds.fs.ls(ds.root, detail=False) if p.endswith(".parquet"))
    assert files == [f"part-{i:06d}.parquet" for i in range(6)]


def test_local_mode_writes_to_gcs_too(gcs, tmp_path):
    w = write_mlp(tmp_path)
    uri = f"gs://{gcs.bucket}/runs/local"
    res = run_job(mlp_spec(w, count=40, shard_size=16), uri)
    assert res.ok and res.committed_shards == 3
    assert_each_sample_once(read_gs(uri, gcs), 40)
    assert run_job(mlp_spec(w, count=40, shard_size=16), uri).computed_shards == 0
