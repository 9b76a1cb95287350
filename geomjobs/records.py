"""The record schema (``geomjobs/schemas/record.v<N>.json``) as an Arrow schema, and record tables.

Versions: 1, and 2 = 1 plus ``cfg_scale`` (the classifier-free guidance scale; version 1 had only
the reward guidance's ``guidance_scale``). Every version's file stays, so datasets written in any of
them can be read and resumed in their own version (:func:`as_version`)."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources

import pyarrow as pa

SCHEMA_VERSION = 2   # the record schema version: its one home (job cards and Parquet metadata read it here)
_TYPES = {"int64": pa.int64(), "int32": pa.int32(), "float64": pa.float64(), "string": pa.string(),
          "list<int64>": pa.list_(pa.int64()), "list<float64>": pa.list_(pa.float64())}


@cache
def record_doc(version: int = SCHEMA_VERSION) -> dict:
    return json.loads(resources.files("geomjobs.schemas").joinpath(f"record.v{version}.json").read_text())


@cache
def record_schema(version: int = SCHEMA_VERSION) -> pa.Schema:
    doc = record_doc(version)
    fields = [pa.field(c["name"], _TYPES[c["type"]], nullable=c["nullable"]) for c in doc["columns"]]
    return pa.schema(fields, metadata={"geomjobs.schema_version": str(version)})


def records_table(columns: dict, *, job_metadata: dict | None = None) -> pa.Table:
    """A table in the record schema; missing nullable columns are all-null."""
    schema = record_schema()
    n = len(columns["sample_id"])
    arrays = []
    for f in schema:
        if f.name in columns:
            arrays.append(pa.array(columns[f.name], type=f.type))
        elif f.nullable:
            arrays.append(pa.nulls(n, type=f.type))
        else:
            raise KeyError(f"record column '{f.name}' is required")
    meta = dict(schema.metadata)
    if job_metadata:
        meta.update({f"geomjobs.{k}".encode(): str(v).encode() for k, v in job_metadata.items()})
    return pa.Table.from_arrays(arrays, schema=schema.with_metadata(meta))


def as_version(table: pa.Table, version: int) -> pa.Table:
    """A record table in the record schema ``version`` (an older one: a dataset created in it keeps
    it): that version's columns in its order, the columns added since dropped (they are all
    nullable), and the metadata saying so. A table already in ``version`` comes back as it is."""
    meta = dict(table.schema.metadata or {})
    if meta.get(b"geomjobs.schema_version") == str(version).encode():
        return table
    schema = record_schema(version)
    meta[b"geomjobs.schema_version"] = str(version).encode()
    return pa.Table.from_arrays([table.column(f.name) for f in schema], schema=schema.with_metadata(meta))
