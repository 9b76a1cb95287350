"""The latent sources of docs/jobs.md: gaussian, grid2d, plane3, parquet (their builders are
registered by kind in :data:`geomjobs.latents.BUILDERS`).

``LatentSource.resolved`` is the spec's ``latents`` section with the defaults the builder applied
filled in, a new mapping: builders never write into the section they are given (where a builder
adds nothing, :func:`geomjobs.latents.build_latents` stores a copy of the section)."""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np

from geomjobs.errors import SpecError
from geomjobs.latents.streams import per_sample_normal


@dataclasses.dataclass
class LatentSource:
    count: int
    shape: tuple[int, ...]
    resolved: dict = dataclasses.field(default_factory=dict, kw_only=True)   # the latents section, defaults filled
    # latents(ids) is plain host code (numpy, pyarrow; no JAX, no precision context), safe to call
    # from another thread: runner.shards then makes the next chunk's latents while the engine runs
    host_only: ClassVar[bool] = False

    def latents(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), *shape) float64 latents for these sample ids."""
        raise NotImplementedError

    def columns(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """Extra record columns for these ids (e.g. u, v)."""
        return {}

    def denoiser_timesteps(self, ids: np.ndarray) -> np.ndarray | None:
        """Each record's own diffusion timestep (int64, one per id) where the job's generator is
        a denoiser evaluated per record (``latents: {kind: trajectory}``); None for sources whose
        records all use the generator as the job built it."""
        return None


@dataclasses.dataclass
class Gaussian(LatentSource):
    host_only: ClassVar[bool] = True
    seed: int = 0
    scale: float = 1.0

    def latents(self, ids):
        # One generator per sample, default_rng([seed, i]): independent of sharding and batching
        # (streams.per_sample_normal draws exactly its values, with the seeding vectorised)
        return per_sample_normal(self.seed, ids, tuple(self.shape)) * self.scale


@dataclasses.dataclass
class Grid2d(LatentSource):
    host_only: ClassVar[bool] = True
    low: tuple[float, float] = (0.0, 0.0)
    high: tuple[float, float] = (1.0, 1.0)
    resolution: tuple[int, int] = (1, 1)

    def _uv(self, ids):
        ids = np.asarray(ids, np.int64)
        nu, nv = self.resolution
        iu, iv = ids // nv, ids % nv          # row-major: sample_id = iu * nv + iv
        u = np.linspace(self.low[0], self.high[0], nu)[iu] if nu > 1 else np.full(len(ids), (self.low[0] + self.high[0]) / 2)
        v = np.linspace(self.low[1], self.high[1], nv)[iv] if nv > 1 else np.full(len(ids), (self.low[1] + self.high[1]) / 2)
        return u, v

    def latents(self, ids):
        u, v = self._uv(ids)
        return np.stack([u, v], axis=-1).reshape(len(ids), *self.shape)

    def columns(self, ids):
        u, v = self._uv(ids)
        return {"u": u, "v": v}


@dataclasses.dataclass
class Plane3(LatentSource):
    """A grid on the plane through three anchor latents a0, a1, a2.

    Basis by Gram-Schmidt: e1 = (a1 - a0)/|a1 - a0|, e2 = the part of a2 - a0 orthogonal to e1,
    normalised. A point with plane coordinates (u, v) is a0 + u e1 + v e2, so the anchors sit
    at (0, 0), (|a1 - a0|, 0) and (<a2 - a0, e1>, <a2 - a0, e2>). The grid covers the anchors'
    bounding box in plane coordinates, widened by ``margin`` times its size on every side.
    """
    host_only: ClassVar[bool] = True
    anchors: np.ndarray = None
    resolution: tuple[int, int] = (1, 1)
    margin: float = 0.25

    def __post_init__(self):
        a = np.asarray(self.anchors, np.float64).reshape(3, -1)
        e1 = a[1] - a[0]
        if np.linalg.norm(e1) == 0:
            raise SpecError("latents.anchors", "anchors 0 and 1 coincide; three distinct, non-collinear latents are needed")
        e1 = e1 / np.linalg.norm(e1)
        r = a[2] - a[0]
        e2 = r - (r @ e1) * e1
        if np.linalg.norm(e2) <= 1e-12 * max(np.linalg.norm(r), 1.0):
            raise SpecError("latents.anchors", "the three anchors are collinear; they do not span a plane")
        e2 = e2 / np.linalg.norm(e2)
        self.origin, self.basis = a[0], np.stack([e1, e2])
        uv = (a - a[0]) @ self.basis.T
        lo, hi = uv.min(0), uv.max(0)
        pad = (hi - lo) * self.margin
        self.low, self.high = lo - pad, hi + pad

    def _uv(self, ids):
        g = Grid2d(self.count, (2,), tuple(self.low), tuple(self.high), tuple(self.resolution))
        return g._uv(ids)

    def latents(self, ids):
        u, v = self._uv(ids)
        pts = self.origin[None] + u[:, None] * self.basis[0][None] + v[:, None] * self.basis[1][None]
        return pts.reshape(len(ids), *self.shape)

    def columns(self, ids):
        u, v = self._uv(ids)
        return {"u": u, "v": v}


@dataclasses.dataclass
class ParquetLatents(LatentSource):
    host_only: ClassVar[bool] = True
    uri: str = ""
    column: str = ""

    def __post_init__(self):
        self._ds = LazyDataset(self.uri)

    def latents(self, ids):
        tab = self._ds().take(np.asarray(ids, np.int64), columns=[self.column])
        col = tab.column(self.column).combine_chunks()
        flat = np.asarray(col.flatten() if hasattr(col, "flatten") else col, np.float64)
        return flat.reshape(len(ids), *self.shape)


class LazyDataset:
    """The Parquet dataset at ``uri``, opened on first call (and again after unpickling: workers
    get the URI, not an open dataset)."""

    def __init__(self, uri: str, dataset=None):
        self.uri, self._dataset = uri, dataset

    def __call__(self):
        if self._dataset is None:
            self._dataset = open_latent_dataset(self.uri)
        return self._dataset

    def __getstate__(self):
        return {"uri": self.uri}

    def __setstate__(self, state):
        self.uri, self._dataset = state["uri"], None


def open_latent_dataset(uri: str):
    import pyarrow.dataset as pds

    from geomjobs.sink.fs import filesystem

    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise SpecError("latents.uri", f"Parquet latents '{uri}' do not exist")
    return pds.dataset(path, filesystem=fs, format="parquet")


def build_gaussian(lat: dict) -> Gaussian:
    return Gaussian(lat["count"], tuple(lat["shape"]), lat.get("seed", 0), lat.get("scale", 1.0))


def build_grid2d(lat: dict) -> Grid2d:
    res = tuple(lat["resolution"])
    for i, key in enumerate("xy"):
        if not lat["low"][i] < lat["high"][i] and res[i] > 1:
            raise SpecError("latents.high", f"expected high > low on axis {key}, got low={lat['low']} high={lat['high']}")
    return Grid2d(res[0] * res[1], (2,), tuple(lat["low"]), tuple(lat["high"]), res)


def build_plane3(lat: dict) -> Plane3:
    dims = {len(a) for a in lat["anchors"]}
    if len(dims) != 1:
        raise SpecError("latents.anchors", f"anchors must have the same length, got lengths {sorted(dims)}")
    d = dims.pop()
    shape = tuple(lat.get("shape", [d]))
    if math.prod(shape) != d:
        raise SpecError("latents.shape", f"shape {list(shape)} holds {math.prod(shape)} values but anchors have {d}")
    res = tuple(lat["resolution"])
    return Plane3(res[0] * res[1], shape, np.asarray(lat["anchors"]), res, lat.get("margin", 0.25))


def build_parquet(lat: dict) -> ParquetLatents:
    """Parquet latents, checked before any work: the column holds lists, there are enough rows,
    and every row used holds exactly prod(shape) values (the first bad row is named)."""
    import pyarrow as pa

    uri, column = lat["uri"], lat["column"]
    ds = open_latent_dataset(uri)
    if column not in ds.schema.names:
        raise SpecError("latents.column", f"column '{column}' is not in '{uri}'; it has {ds.schema.names}")
    typ = ds.schema.field(column).type
    if not (pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ)):
        raise SpecError("latents.column", f"column '{column}' must hold lists of numbers (one latent per row), got {typ}")
    rows = ds.count_rows()
    count = lat.get("count", rows)
    if count > rows:
        raise SpecError("latents.count", f"asked for {count} latents but '{uri}' has {rows} rows")
    first = ds.take([0], columns=[column]).column(column)[0].as_py() if rows else []
    shape = tuple(lat.get("shape", [len(first or [])]))
    if math.prod(shape) != len(first or []):
        raise SpecError("latents.shape", f"shape {list(shape)} holds {math.prod(shape)} values but rows of "
                                         f"'{column}' have {len(first or [])}")
    _check_row_lengths(ds, lat, count, math.prod(shape))
    return ParquetLatents(count, shape, uri, column)


def _check_row_lengths(ds, lat: dict, count: int, size: int) -> None:
    """Raise SpecError('latents.column') naming the first of rows 0..count-1 that is null or
    does not hold ``size`` values (a ragged column would otherwise fail mid-job)."""
    import pyarrow.compute as pc

    column, start = lat["column"], 0
    for batch in ds.to_batches(columns=[column]):
        if start >= count:
            return
        col = batch.column(0).slice(0, count - start)
        lengths = pc.list_value_length(col).fill_null(-1).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(lengths != size)
        if len(bad):
            i, n = start + int(bad[0]), int(lengths[bad[0]])
            what = "is null" if n < 0 else f"holds {n} values"
            raise SpecError("latents.column", f"row {i} of column '{column}' in '{lat['uri']}' {what}, expected {size} "
                                              f"(latent shape {list(lat.get('shape', [size]))}); every row must hold one latent")
        start += len(batch)
