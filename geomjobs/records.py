"""The record schema (``geomjobs/schemas/record.v<N>.json``) as an Arrow schema, and record tables."""
from __future__ import annotations

import json
from functools import cache
from importlib import resources

import pyarrow as pa

SCHEMA_VERSION = 1   # the record schema version: its one home (job cards and Parquet metadata read it here)
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
