"""A geomjobs dataset: Parquet shards plus a manifest, safe to resume and to read while written.

Layout under the dataset URI::

    part-000000.parquet ...          one file per committed shard (deterministic names)
    _artifacts/projections.npz       W (k x n) and B (P x d), the exact matrices used
    _geomjobs/spec.yaml              the resolved spec (what a rerun compares against)
    _geomjobs/job.json               job id, spec hash, sample and shard counts, schema version
    _geomjobs/shards/000000.json     commit marker of shard 0: the manifest is this folder
    _geomjobs/manifest.json.gz       a cache of the markers' contents (see below), never the truth
    _geomjobs/failures/000000.json   last error of a shard that could not be computed

A shard is committed in two steps: its Parquet file appears atomically (local: written under
``_staging/`` and renamed; GCS: an object becomes visible only when its upload completes),
then its marker is written. Resume skips shards with a marker; a shard whose file exists but
whose marker does not (a crash between the steps) is recomputed and its file replaced under
the same name, so no sample is ever present twice. pandas and pyarrow skip ``_``-prefixed
folders; DuckDB's ``**/*.parquet`` does descend into them, but nothing there ends in
``.parquet`` (staging files end in ``.tmp``), so every reader sees exactly the part files.

Reading the manifest in a bounded number of requests
----------------------------------------------------
A shard is committed iff its marker exists, so reading the manifest starts with one listing of
``_geomjobs/shards/`` (one request per 1,000 markers on GCS: the listing also gives each
object's version, its GCS ``generation``, or inode, size and mtime locally). The markers'
*contents* (row counts, engine, worker) come from ``_geomjobs/manifest.json.gz``, a compacted
copy of markers keyed by marker name *and version*: an entry is used only for a marker that is
listed now with the same version, so the cache can be stale, raced or lost without effect: a
marker absent from the listing is not committed whatever the cache says, a marker written or
rewritten since the cache was (a newer generation) is read from its object, and an unreadable
cache is ignored. Markers missing from the cache are read concurrently (``fs.cat`` of the
list, ``READ_CONCURRENCY`` at a time). Whoever reads ``COMPACT_MIN_NEW`` or more of them
(resume, the job's summary, ``geomjobs inspect``) rewrites the cache, and every ``Dataset``
that commits (the in-process driver, each Ray worker) rewrites it after each ``COMPACT_EVERY``
of its own commits, so at most about ``COMPACT_EVERY`` markers per writer are ever read one by
one. The cache is written like every object here, in one step (GCS uploads are atomic; locally a
temporary file renamed over it); two writers racing leave one complete cache or the other, each
true of the markers it was built from, so the version check keeps either one safe.
"""
from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from geomjobs.errors import DatasetError  # noqa: F401 (its home is geomjobs.errors; importable from here as before)
from geomjobs.records import SCHEMA_VERSION, as_version, record_schema
from geomjobs.sink.fs import filesystem, is_local, join, normalize_uri
from geomjobs.spec import with_current_keys

MANIFEST = "_geomjobs/manifest.json.gz"
MANIFEST_FORMAT = 1
COMPACT_MIN_NEW = 64      # a read that found this many markers not in the cache rewrites it
COMPACT_EVERY = 256       # a Dataset rewrites the cache after every this many of its own commits
READ_CONCURRENCY = 64     # markers read at once from a remote store (fsspec's cat batch size)

log = logging.getLogger(__name__)


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


def marker_name(shard: int) -> str:
    return f"{shard:06d}.json"


def _version(info: dict) -> str:
    """An object's version from a listing entry: its GCS generation (new on every write), or
    locally inode:size:mtime (a marker is always replaced by a rename, so its inode changes)."""
    gen = info.get("generation")
    if gen:
        return f"g{gen}"
    return f"{info.get('ino')}:{info.get('size')}:{info.get('mtime')}"


def _upload_version(response) -> str | None:
    """The version of an object just uploaded, from gcsfs's upload response (the object
    resource), or None when the response does not carry it."""
    gen = response.get("generation") if isinstance(response, dict) else None
    return f"g{gen}" if gen else None


@dataclasses.dataclass(frozen=True)
class Summary:
    """A dataset's state from its manifest (what ``geomjobs inspect``, ``geomjobs status`` and a
    driver's result report). ``failures`` holds only shards with no commit marker."""
    uri: str
    job: dict                       # _geomjobs/job.json
    committed: dict[int, dict]      # shard -> commit marker
    failures: dict[int, dict]       # shard -> last failure record, for shards not committed

    @property
    def rows(self) -> int:
        return sum(m["rows"] for m in self.committed.values())

    @property
    def errors(self) -> int:
        """Rows with status 'error' in the committed shards."""
        return sum(m["errors"] for m in self.committed.values())

    @property
    def pending(self) -> int:
        """Shards neither committed nor failed."""
        return self.job["num_shards"] - len(self.committed) - len(self.failures)

    def engines(self) -> list[dict]:
        """Distinct engine settings (Engine.describe) over the committed shards' markers, each
        with its shard count under ``shards``."""
        seen: dict = {}
        for m in self.committed.values():
            e = m.get("engine")
            if e:
                key = json.dumps(e, sort_keys=True)
                seen.setdefault(key, {**e, "shards": 0})["shards"] += 1
        return list(seen.values())


def shard_marker(shard: int, table: pa.Table, *, worker: str = "", engine: dict | None = None) -> dict:
    """The commit marker of ``shard`` whose records are ``table``."""
    status = table.column("status").to_pylist()
    return {"shard": shard, "file": part_name(shard), "rows": table.num_rows,
            "errors": sum(s != "ok" for s in status),
            "first_sample": int(table.column("sample_id")[0].as_py()) if table.num_rows else None,
            "committed_at": time.time(), "worker": worker, **({"engine": engine} if engine else {})}


class Dataset:
    def __init__(self, uri: str):
        self.uri = normalize_uri(uri)
        self.fs, self.root = filesystem(self.uri)
        self._local = is_local(self.uri)
        # markers written through this object since it last wrote the cache: name -> (version, marker)
        self._written: dict[str, tuple[str, dict]] = {}
        self._pending = 0          # commits through this object since it last wrote the cache
        self._schema_version = None   # the job card's record schema version, read on first commit

    # ---- low-level atomic writes -------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _put(self, rel: str, data: bytes) -> str | None:
        """Make ``rel`` appear with ``data`` in one step (never half-written under its name).
        Returns the version the object now has, as a listing reports it (see ``_version``),
        when the store says so."""
        dest = self._path(rel)
        if self._local:
            staging = self._path("_staging")
            os.makedirs(staging, exist_ok=True)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = os.path.join(staging, f"{os.path.basename(rel)}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                st = os.fstat(f.fileno())    # this file's own inode: a rename keeps inode and mtime
            os.replace(tmp, dest)
            return _version({"ino": st.st_ino, "size": st.st_size, "mtime": st.st_mtime})
        return _upload_version(self.fs.pipe_file(dest, data))

    def _put_many(self, items: dict[str, bytes]) -> dict[str, str | None]:
        """``_put`` of each item; remote writes run concurrently (fsspec ``pipe`` of a dict)."""
        if self._local or len(items) <= 1:
            return {rel: self._put(rel, data) for rel, data in items.items()}
        got = self.fs.pipe({self._path(rel): data for rel, data in items.items()}, batch_size=READ_CONCURRENCY)
        got = got if isinstance(got, list) and len(got) == len(items) else [None] * len(items)
        return {rel: _upload_version(r) for rel, r in zip(items, got)}

    def _get(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def _get_many(self, rels: list[str]) -> dict[str, bytes]:
        """Contents of ``rels`` read concurrently (fsspec ``cat`` of a list: one GET each on GCS,
        ``READ_CONCURRENCY`` in flight); objects that are gone are left out, other errors raise."""
        if not rels:
            return {}
        paths = {self.fs._strip_protocol(self._path(r)): r for r in rels}
        kw = {"batch_size": READ_CONCURRENCY} if getattr(self.fs, "async_impl", False) else {}
        got = self.fs.cat(list(paths), on_error="return", **kw)
        out = {}
        for path, data in got.items():
            if isinstance(data, FileNotFoundError):
                continue
            if isinstance(data, BaseException):
                raise data
            out[paths[path]] = data
        return out

    def _listing(self, rel: str) -> dict[str, str]:
        """``*.json`` files directly under ``rel``: name -> version (one listing)."""
        try:
            infos = self.fs.ls(self._path(rel), detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for info in infos:
            name = os.path.basename(info["name"].rstrip("/"))
            if info.get("type") == "file" and name.endswith(".json"):
                out[name] = _version(info)
        return out

    def _exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def _rm(self, rel: str) -> None:
        try:
            self.fs.rm_file(self._path(rel))
        except FileNotFoundError:
            pass

    # ---- job metadata ------------------------------------------------------------------
    def exists(self) -> bool:
        return self._exists("_geomjobs/job.json")

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def job(self) -> dict:
        return json.loads(self._get("_geomjobs/job.json"))

    def spec(self) -> dict:
        """The stored spec, its model keys under their current names (a spec an older release
        stored reads as this release writes it: :func:`geomjobs.spec.with_current_keys`)."""
        return with_current_keys(yaml.safe_load(self._get("_geomjobs/spec.yaml")))

    def initialize(self, spec: dict, job: dict, artifacts: dict[str, np.ndarray]) -> None:
        """Write spec, job card and artifacts of a new job (idempotent for the same job)."""
        buf = io.BytesIO()
        np.savez(buf, **artifacts)
        self._put("_artifacts/projections.npz", buf.getvalue())
        self._put("_geomjobs/spec.yaml", yaml.safe_dump(spec, sort_keys=False).encode())
        self._put("_geomjobs/job.json", json.dumps(job, indent=2).encode())

    def artifacts(self) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self._get("_artifacts/projections.npz"))) as z:
            return {k: z[k] for k in z.files}

    # ---- shards ------------------------------------------------------------------------
    def committed(self, *, compact: bool = True) -> dict[int, dict]:
        """The manifest: shard index -> its commit marker, for every marker that exists now.
        One listing, one read of the cache, concurrent reads of the markers it lacks (see the
        module docstring); with ``compact``, a read that found ``COMPACT_MIN_NEW`` markers
        outside the cache, or as many cache entries no longer listed, rewrites it."""
        markers, stale = self._markers()
        if compact and stale >= COMPACT_MIN_NEW:
            self._write_cache(markers)
        return {int(n[:-5]): m for n, (_, m) in sorted(markers.items())}

    def compact(self) -> int:
        """Rewrite the manifest cache from the markers that exist now; returns their count."""
        markers, _ = self._markers()
        self._write_cache(markers)
        return len(markers)

    def _markers(self) -> tuple[dict[str, tuple[str, dict]], int]:
        """(marker name -> (version, marker) for every listed marker, how far the cache was
        off: markers read from their objects plus cache entries not listed any more)."""
        listed = self._listing("_geomjobs/shards")
        cache = self._read_cache()
        out, todo = {}, []
        for name, version in listed.items():
            hit = next((h for h in (self._written.get(name), cache.get(name)) if h is not None and h[0] == version), None)
            if hit is not None:
                out[name] = hit
            else:
                todo.append(name)
        for rel, data in self._get_many([f"_geomjobs/shards/{n}" for n in todo]).items():
            name = os.path.basename(rel)
            out[name] = (listed[name], json.loads(data))
        # a marker listed but gone before it was read (deleted meanwhile) is not committed
        gone = sum(n not in listed for n in cache)
        return out, len(todo) + gone

    def committed_one_by_one(self) -> dict[int, dict]:
        """The manifest read as before the cache: a listing, then each marker in turn. The
        reference the cached path is tested against, and the benchmark's baseline."""
        out = {}
        for name in sorted(self._listing("_geomjobs/shards")):
            try:
                out[int(name[:-5])] = json.loads(self._get(f"_geomjobs/shards/{name}"))
            except FileNotFoundError:
                pass
        return out

    def _read_cache(self) -> dict[str, tuple[str, dict]]:
        """marker name -> (version, marker) from the cache; {} when there is none or it cannot
        be decoded (a cache, so a bad one only costs reads)."""
        try:
            raw = self._get(MANIFEST)
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(gzip.decompress(raw))
            if doc.get("format") != MANIFEST_FORMAT:
                return {}
            engines = doc["engines"]
            out = {}
            for name, (version, marker, engine) in doc["markers"].items():
                if engine is not None:
                    marker = {**marker, "engine": engines[engine]}
                out[name] = (version, marker)
            return out
        except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:
            log.warning("ignoring unreadable manifest cache %s: %s", self._path(MANIFEST), e)
            return {}

    def _write_cache(self, entries: dict[str, tuple[str, dict]]) -> None:
        """Write the cache in one step. Engine descriptions (the same in most markers) are kept
        once. Best effort: a reader that may not write (read-only credentials) still reads."""
        engines: dict[str, int] = {}
        rows = {}
        for name, (version, marker) in sorted(entries.items()):
            marker = dict(marker)
            e = marker.pop("engine", None)
            idx = None
            if e is not None:
                idx = engines.setdefault(json.dumps(e, sort_keys=True), len(engines))
            rows[name] = [version, marker, idx]
        doc = {"format": MANIFEST_FORMAT, "written_at": time.time(), "engines": [json.loads(k) for k in engines],
               "markers": rows}
        try:
            self._put(MANIFEST, gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), compresslevel=5))
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only a slower next read
            log.warning("could not write the manifest cache %s: %s", self._path(MANIFEST), e)
            return
        self._written, self._pending = {}, 0

    def failures(self) -> dict[int, dict]:
        """shard -> its last failure record (one listing, then the records read concurrently)."""
        got = self._get_many([f"_geomjobs/failures/{n}" for n in self._listing("_geomjobs/failures")])
        return {int(os.path.basename(rel)[:-5]): json.loads(data) for rel, data in sorted(got.items())}

    def summary(self) -> Summary:
        """The manifest summed up: job card, committed shards, failed shards not committed since."""
        committed = self.committed()
        failures = {k: v for k, v in self.failures().items() if k not in committed}
        return Summary(self.uri, self.job(), committed, failures)

    def schema_version(self) -> int:
        """The record schema version this dataset was created with (its job card's; read once)."""
        if self._schema_version is None:
            try:
                self._schema_version = int(self.job().get("schema_version", 1))
            except FileNotFoundError:    # no job card (yet): records are written as they come
                return SCHEMA_VERSION
        return self._schema_version

    def commit_shard(self, shard: int, table: pa.Table, *, worker: str = "", engine: dict | None = None) -> dict:
        """Write shard's records, then its marker. Safe to repeat for the same shard.
        ``engine``: how the step ran (Engine.describe), kept in the marker. A dataset created in
        an older record schema (a job resumed by a later release) keeps it: the records are
        written in that version (:func:`geomjobs.records.as_version`)."""
        if self.schema_version() != SCHEMA_VERSION:
            table = as_version(table, self.schema_version())
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self._put(part_name(shard), buf.getvalue())
        marker = shard_marker(shard, table, worker=worker, engine=engine)
        self.write_markers([marker])
        self._rm(f"_geomjobs/failures/{shard:06d}.json")
        return marker

    def write_markers(self, markers: list[dict]) -> None:
        """Commit shards whose files are in place: write their markers (concurrently when there
        are many); after every ``COMPACT_EVERY`` of them through this object, rewrite the cache
        (markers this object wrote need no reading back: the upload says their version)."""
        items = {marker_name(m["shard"]): json.dumps(m).encode() for m in markers}
        versions = self._put_many({f"_geomjobs/shards/{n}": data for n, data in items.items()})
        for m in markers:
            version = versions.get(f"_geomjobs/shards/{marker_name(m['shard'])}")
            if version is not None:
                self._written[marker_name(m["shard"])] = (version, m)
        self._pending += len(markers)
        if self._pending >= COMPACT_EVERY:
            try:
                self.compact()
            except Exception as e:  # noqa: BLE001 - the commit is done; the cache is only an optimisation
                log.warning("could not compact the manifest of %s: %s", self.uri, e)

    def record_failure(self, shard: int, error: str, attempts: int) -> None:
        self._put(f"_geomjobs/failures/{shard:06d}.json",
                  json.dumps({"shard": shard, "error": error, "attempts": attempts, "failed_at": time.time()}).encode())

    def clean_staging(self) -> None:
        if self._local and self._exists("_staging"):
            self.fs.rm(self._path("_staging"), recursive=True)

    def read_table(self) -> pa.Table:
        """All committed records (only files with a marker), sorted by sample_id, in the record
        schema of the files (a dataset's own version; files of different versions are unified by
        column name, the missing columns null)."""
        tables = [pq.read_table(io.BytesIO(self._get(m["file"]))) for _, m in sorted(self.committed().items())]
        if not tables:
            return record_schema(self.schema_version()).empty_table()
        return pa.concat_tables(tables, promote_options="default").sort_by("sample_id")
