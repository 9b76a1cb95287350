"""Reading geomjobs datasets for analysis: the ``ok`` rows as a DataFrame, or a DuckDB view.

A dataset is a folder (local or ``gs://``) of ``part-*.parquet`` files plus ``_``-prefixed
bookkeeping folders (see :mod:`geomjobs.sink.dataset`); readers here see only the Parquet parts.
Local datasets are read by DuckDB's ``read_parquet`` (heavy aggregation stays in DuckDB); remote
ones through pyarrow over the project's fsspec filesystem (DuckDB's httpfs extension would be a
download at run time), registered in DuckDB as an Arrow dataset.
"""
from __future__ import annotations

import re

import pyarrow.dataset as pds

from geomjobs.sink.fs import filesystem, is_local, normalize_uri

__all__ = ["arrow_dataset", "duckdb_view", "read_ok"]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def arrow_dataset(uri: str) -> pds.Dataset:
    """The Parquet parts of the dataset at ``uri`` as a pyarrow dataset (``_`` folders skipped).
    Raises FileNotFoundError naming the URI when there is no dataset, or no committed shard yet."""
    uri = normalize_uri(uri)
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"no geomjobs dataset at '{uri}' (the path does not exist)")
    ds = pds.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    if not ds.files:
        raise FileNotFoundError(f"'{uri}' holds no Parquet parts (no committed shard yet?)")
    return ds


def _parquet_files_sql(ds: pds.Dataset) -> str:
    """The dataset's part files as a DuckDB list literal. An explicit list, not a ``**/*.parquet``
    glob: DuckDB's glob descends into ``_``-prefixed folders too; the list is the parts present
    when it was made (a view made while a job runs does not see later shards)."""
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in ds.files) + "]"


def _check_columns(names, columns) -> list[str] | None:
    if columns is None:
        return None
    columns = [columns] if isinstance(columns, str) else list(columns)
    missing = [c for c in columns if c not in names]
    if missing:
        raise KeyError(f"columns {missing} are not in the dataset; it has {list(names)}")
    return columns


def read_ok(uri: str, columns=None):
    """The rows with ``status == 'ok'`` of the geomjobs dataset at ``uri`` (local path, file:// or
    gs://) as a pandas DataFrame sorted by ``sample_id``; ``columns``: only these (``sample_id``
    is always kept first, so rows stay identifiable)."""
    ds = arrow_dataset(uri)
    cols = _check_columns(ds.schema.names, columns)
    if cols is not None and "sample_id" not in cols:
        cols = ["sample_id", *cols]
    if is_local(uri):
        import duckdb

        sel = "*" if cols is None else ", ".join(f'"{c}"' for c in cols)
        con = duckdb.connect()
        try:
            df = con.sql(f"SELECT {sel} FROM read_parquet({_parquet_files_sql(ds)}) "
                         "WHERE status = 'ok' ORDER BY sample_id").df()
        finally:
            con.close()
        return df
    table = ds.to_table(columns=cols, filter=pds.field("status") == "ok")
    return table.to_pandas().sort_values("sample_id").reset_index(drop=True)


def duckdb_view(con, name: str, uri: str, *, ok_only: bool = False):
    """Create (or replace) view ``name`` on DuckDB connection ``con`` over every row of the
    dataset at ``uri`` (``ok_only``: only rows with status 'ok') and return it as a relation
    (lazy: each read re-runs the scan; ``.materialize()`` or ``.df()`` to keep a result). The view
    covers the Parquet parts present now (see :func:`_parquet_files_sql`)."""
    if not _IDENT.match(name):
        raise ValueError(f"view name must be an SQL identifier, got {name!r}")
    where = " WHERE status = 'ok'" if ok_only else ""
    if is_local(uri):
        files = _parquet_files_sql(arrow_dataset(uri))
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({files}){where}")
    else:
        src = f"_geomjobs_src_{name}"
        con.register(src, arrow_dataset(uri))
        con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM {src}{where}")
    return con.table(name)
