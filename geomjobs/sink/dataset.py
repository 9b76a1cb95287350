"""A geomjobs dataset: Parquet shards plus a manifest, safe to resume and to read while written.

Layout under the dataset URI::

    part-000000.parquet ...          one file per committed shard (deterministic names)
    _artifacts/projections.npz       W (k x n) and B (P x d), the exact matrices used
    _geomjobs/spec.yaml              the resolved spec (what --resume compares against)
    _geomjobs/job.json               job id, spec hash, sample and shard counts, schema version
    _geomjobs/shards/000000.json     commit marker of shard 0: the manifest is this folder
    _geomjobs/failures/000000.json   last error of a shard that could not be computed

A shard is committed in two steps: its Parquet file appears atomically (local: written under
``_staging/`` and renamed; GCS: an object becomes visible only when its upload completes),
then its marker is written. Resume skips shards with a marker; a shard whose file exists but
whose marker does not (a crash between the steps) is recomputed and its file replaced under
the same name, so no sample is ever present twice. Readers (pandas, pyarrow, DuckDB's
``**/*.parquet``) skip ``_``-prefixed folders, and staging files never end in ``.parquet``.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from geomjobs.sink.fs import filesystem, is_local, join, normalize_uri


class DatasetError(RuntimeError):
    """The output location cannot be used as asked (exists without --resume, spec differs...)."""


def part_name(shard: int) -> str:
    return f"part-{shard:06d}.parquet"


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


class Dataset:
    def __init__(self, uri: str):
        self.uri = normalize_uri(uri)
        self.fs, self.root = filesystem(self.uri)
        self._local = is_local(self.uri)

    # ---- low-level atomic writes -------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return join(self.root, *parts)

    def _put(self, rel: str, data: bytes) -> None:
        """Make ``rel`` appear with ``data`` in one step (never half-written under its name)."""
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
            os.replace(tmp, dest)
        else:
            self.fs.pipe_file(dest, data)

    def _get(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def _exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def _list(self, rel: str) -> list[str]:
        p = self._path(rel)
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def _rm(self, rel: str) -> None:
        if self._exists(rel):
            self.fs.rm(self._path(rel))

    # ---- job metadata ------------------------------------------------------------------
    def exists(self) -> bool:
        return self._exists("_geomjobs/job.json")

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.fs.ls(self.root, detail=False)

    def job(self) -> dict:
        return json.loads(self._get("_geomjobs/job.json"))

    def spec(self) -> dict:
        return yaml.safe_load(self._get("_geomjobs/spec.yaml"))

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
    def committed(self) -> dict[int, dict]:
        """The manifest: shard index -> its commit marker."""
        out = {}
        for name in self._list("_geomjobs/shards"):
            if name.endswith(".json"):
                out[int(name[:-5])] = json.loads(self._get(f"_geomjobs/shards/{name}"))
        return out

    def failures(self) -> dict[int, dict]:
        out = {}
        for name in self._list("_geomjobs/failures"):
            if name.endswith(".json"):
                out[int(name[:-5])] = json.loads(self._get(f"_geomjobs/failures/{name}"))
        return out

    def summary(self) -> Summary:
        """The manifest summed up: job card, committed shards, failed shards not committed since."""
        committed = self.committed()
        failures = {k: v for k, v in self.failures().items() if k not in committed}
        return Summary(self.uri, self.job(), committed, failures)

    def commit_shard(self, shard: int, table: pa.Table, *, worker: str = "", engine: dict | None = None) -> dict:
        """Write shard's records, then its marker. Safe to repeat for the same shard.
        ``engine``: how the step ran (Engine.describe), kept in the marker."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self._put(part_name(shard), buf.getvalue())
        status = table.column("status").to_pylist()
        marker = {"shard": shard, "file": part_name(shard), "rows": table.num_rows,
                  "errors": sum(s != "ok" for s in status),
                  "first_sample": int(table.column("sample_id")[0].as_py()) if table.num_rows else None,
                  "committed_at": time.time(), "worker": worker, **({"engine": engine} if engine else {})}
        self._put(f"_geomjobs/shards/{shard:06d}.json", json.dumps(marker).encode())
        self._rm(f"_geomjobs/failures/{shard:06d}.json")
        return marker

    def record_failure(self, shard: int, error: str, attempts: int) -> None:
        self._put(f"_geomjobs/failures/{shard:06d}.json",
                  json.dumps({"shard": shard, "error": error, "attempts": attempts, "failed_at": time.time()}).encode())

    def clean_staging(self) -> None:
        if self._local and self._exists("_staging"):
            self.fs.rm(self._path("_staging"), recursive=True)

    def read_table(self) -> pa.Table:
        """All committed records (only files with a marker), sorted by sample_id."""
        tables = [pq.read_table(io.BytesIO(self._get(m["file"]))) for _, m in sorted(self.committed().items())]
        if not tables:
            from geomjobs.records import record_schema
            return record_schema().empty_table()
        return pa.concat_tables(tables).sort_by("sample_id")
