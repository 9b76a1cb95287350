"""The manifest at scale: resume and ``geomjobs inspect`` cost a bounded number of requests.

Requests are counted on the wire by a proxy in front of the GCS emulator (tests/gcs_counter.py),
which pages listings as GCS does (1,000 objects a page). Markers are written through
``Dataset.write_markers``, the call ``commit_shard`` makes after a shard's file is in place (the
Parquet files themselves are not written: resume and inspect never read them). The cache is only
ever trusted for markers that exist with the version it recorded: checked against the per-marker
reference (``committed_one_by_one``) after deletions, rewrites, a lost compaction race and a
corrupt cache, on gs:// and on a local path.
"""
import gzip
import json
import math
import os

import pyarrow as pa
import pytest
from gcs_counter import GCS_PAGE, FastEmulator

import geomjobs.sink.dataset as dataset_mod
from geomjobs.runner.job import open_job
from geomjobs.runner.local import run_local
from geomjobs.runner.plan import plan_job
from geomjobs.sink.dataset import MANIFEST, Dataset, shard_marker

from jobs import assert_each_sample_once, mlp_spec, write_mlp
from ray_cluster import cli, serving

TAIL = 200     # markers committed after the last compaction (a driver that crashed mid-job)
ENGINE = {"mode": "projection", "k": 5, "chunk": None, "devices": 1, "xla_memory_bytes": 123456}


@pytest.fixture(scope="module")
def gcs():
    with serving(FastEmulator()) as em:
        yield em


def markers(start, stop):
    """Markers as commit_shard makes them, for shards of one sample each (sample_id = shard)."""
    out = []
    for shard in range(start, stop):
        table = pa.table({"sample_id": pa.array([shard], pa.int64()), "status": ["ok"]})
        out.append(shard_marker(shard, table, worker=f"ray:w{shard % 3}", engine=ENGINE))
    return out


def commit_uncompacted(uri, ms):
    """Commit ``ms`` through Datasets that each stay under COMPACT_EVERY commits (no cache write)."""
    step = dataset_mod.COMPACT_EVERY - 1
    for i in range(0, len(ms), step):
        Dataset(uri).write_markers(ms[i:i + step])


def read_sorted(uri, gcs):
    """The dataset's Parquet files as pandas reads them (a fresh, uncached gcsfs for gs://)."""
    import pandas as pd
    from gcsfs.core import GCSFileSystem

    if uri.startswith("gs://"):
        fs = GCSFileSystem(endpoint_url=gcs.host, token="anon", use_listings_cache=False, skip_instance_cache=True)
        df = pd.read_parquet(uri.removeprefix("gs://"), filesystem=fs)
    else:
        df = pd.read_parquet(uri)
    return df.sort_values("sample_id").reset_index(drop=True)


def counted(gcs, fn):
    gcs.proxy.reset()
    out = fn()
    return out, gcs.proxy.snapshot()


# 1,000 against 10,000 shards: listing pages 1 and 10 (~17 s, most of it the emulator taking in
# 11,000 uploads; ray_cluster.emulator_command says why it once took minutes)
def test_resume_and_inspect_cost_a_bounded_number_of_requests(gcs, tmp_path):
    total = 10_000
    spec = mlp_spec(write_mlp(tmp_path), count=total, shard_size=1)
    uri = f"gs://{gcs.bucket}/scale-{total}"
    open_job(plan_job(spec), uri)           # job card, spec, artifacts
    expected = {m["shard"]: m for m in markers(0, total)}
    bulk = Dataset(uri)                                    # one long-lived writer, as a worker is
    cost, done = {}, 0
    for n in (1000, total):
        # up to n - TAIL: committed and compacted (every COMPACT_EVERY commits the writer rewrites
        # the cache, from the versions its uploads returned); the last TAIL: committed since
        bulk.write_markers([expected[s] for s in range(done, n - TAIL)])
        bulk.compact()
        commit_uncompacted(uri, [expected[s] for s in range(n - TAIL, n)])
        done = n

        job, resume = counted(gcs, lambda: open_job(plan_job(spec), uri))
        assert job.done == frozenset(range(n)) and job.todo == list(range(n, total))
        p, inspect = counted(gcs, lambda: cli("inspect", uri, "--json", env={"STORAGE_EMULATOR_HOST": gcs.host}))
        assert p.returncode == 0, p.stderr
        info = json.loads(p.stdout)
        assert info["rows"] == n and info["shards"] == {"total": total, "committed": n, "failed": 0, "pending": total - n}
        assert info["engines"] == [{**ENGINE, "shards": n}]
        assert Dataset(uri).committed() == {s: expected[s] for s in range(n)}
        cost[n] = {"resume": resume, "inspect": inspect}

    pages = {n: math.ceil(n / GCS_PAGE) for n in cost}
    for op in ("resume", "inspect"):
        small, large = cost[1000][op], cost[total][op]
        # the only requests that grow with the shard count are the marker listing's pages (one
        # listing per operation, 1,000 markers a page on GCS): everything else is the same
        # ('info' and one-entry listings are gcsfs's exists(): it sends an object lookup and a
        # one-entry listing at once and may cancel the second, so those vary by one or two)
        assert large["list"] - small["list"] - pages[total] + pages[1000] in range(-2, 3), (small, large)
        fixed = ("read", "write", "delete", "other")
        assert {k: small.get(k) for k in fixed} == {k: large.get(k) for k in fixed}, (small, large)
        assert large["list"] <= pages[total] + 3 and large.get("info", 0) <= 3   # markers, failures, exists()
    # resume reads the job card, the spec, the cache and the TAIL markers newer than the cache,
    # and writes the cache once (its TAIL >= COMPACT_MIN_NEW); inspect right after reads no marker
    assert TAIL <= cost[total]["resume"]["read"] <= TAIL + 4 and cost[total]["resume"]["write"] == 1
    assert cost[total]["inspect"]["read"] <= 4 and "write" not in cost[total]["inspect"]
    assert sum(cost[total]["resume"].values()) <= TAIL + pages[total] + 12
    assert sum(cost[total]["inspect"].values()) <= pages[total] + 10

    # the counter sees every request: the per-marker reference reads each of the 300 it lists
    small_uri = f"gs://{gcs.bucket}/scale-ref-{total}"
    Dataset(small_uri).write_markers(markers(0, 300))
    ref, n_req = counted(gcs, lambda: Dataset(small_uri).committed_one_by_one())
    assert len(ref) == 300 and n_req["read"] == 300 and n_req["list"] == 1


@pytest.fixture(params=["gs", "local"])
def uri(request, gcs, tmp_path):
    return f"gs://{gcs.bucket}/cache-{os.getpid()}-{tmp_path.name}" if request.param == "gs" else str(tmp_path / "ds")


def test_the_cache_is_never_trusted_for_a_marker_that_is_gone_or_newer(uri):
    # 150 markers at the library's own threshold (COMPACT_MIN_NEW = 64: a read that finds 64 not
    # in the cache rewrites it)
    n = 150
    assert dataset_mod.COMPACT_MIN_NEW <= n // 2
    ref = lambda: Dataset(uri).committed_one_by_one()  # noqa: E731 - the reference: each marker read
    got = lambda: Dataset(uri).committed(compact=False)  # noqa: E731
    Dataset(uri).write_markers(markers(0, n))
    ds = Dataset(uri)
    assert ds.compact() == n
    want = ref()
    assert got() == want and len(want) == n

    # markers deleted after the cache was written: not committed, whatever the cache says
    gone = {0, n // 2, n - 1}
    for s in gone:
        ds.fs.rm_file(f"{ds.root}/_geomjobs/shards/{s:06d}.json")
    have = got()
    assert have == ref() and not gone & set(have) and len(have) == n - 3

    # a marker rewritten since (a retried shard committed again): its new content, not the cached one
    m = {**markers(5, 6)[0], "worker": "ray:rewritten"}
    Dataset(uri).write_markers([m])
    have = got()
    assert have[5]["worker"] == "ray:rewritten" and have == ref()

    # a compaction that lost a race: the cache written last was built before shard n and
    # before shard 9's rewrite; both are read from their markers
    old_cache = ds._get(MANIFEST)
    Dataset(uri).write_markers([markers(n, n + 1)[0], {**markers(9, 10)[0], "worker": "ray:again"}])
    ds.compact()
    ds._put(MANIFEST, old_cache)
    have, want = got(), ref()
    assert have[n]["shard"] == n and have[9]["worker"] == "ray:again" and have == want

    # a cache that cannot be decoded (another format, torn bytes, not gzip) is ignored
    good = gzip.decompress(ds._get(MANIFEST))
    for bad in (gzip.compress(json.dumps({"format": 99}).encode()), gzip.compress(good)[:40], b"not a cache"):
        ds._put(MANIFEST, bad)
        assert got() == want
    # ... and rewritten by the next read that may compact, after which it serves every marker
    assert Dataset(uri).committed() == want
    assert Dataset(uri)._markers()[1] == 0


def test_a_job_resumes_from_the_cache_and_recomputes_only_shards_without_a_marker(gcs, tmp_path, monkeypatch):
    # compaction every 2 commits during the job (in process), so the cache covers the shards
    monkeypatch.setattr(dataset_mod, "COMPACT_EVERY", 2)
    monkeypatch.setattr(dataset_mod, "COMPACT_MIN_NEW", 1)
    w = write_mlp(tmp_path)
    spec = mlp_spec(w, count=40, shard_size=5)
    for uri in (f"gs://{gcs.bucket}/job-{tmp_path.name}", str(tmp_path / "local")):
        res = run_local(spec, uri, progress=False)
        assert res.ok and res.committed_shards == 8
        ds = Dataset(uri)
        cached = ds._read_cache()
        assert len(cached) == 8 and ds._markers()[1] == 0      # every marker served by the cache
        # shard 3's marker lost (a crash between its file and its marker): resume recomputes it alone
        ds.fs.rm_file(f"{ds.root}/_geomjobs/shards/000003.json")
        assert sorted(Dataset(uri).committed()) == [0, 1, 2, 4, 5, 6, 7]
        again = run_local(spec, uri, progress=False)
        assert again.ok and again.computed_shards == 1 and again.committed_shards == 8
        assert_each_sample_once(read_sorted(uri, gcs), 40)
        assert Dataset(uri).committed() == Dataset(uri).committed_one_by_one()
