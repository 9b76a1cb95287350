"""Reward-model training data read from geomjobs datasets (docs/reward.md).

For each dataset only the small columns of its ``ok`` rows are read, by Parquet column projection
over the committed part files: ``sample_id``, ``diffusion_t``, ``timestep`` and the target (about
20 bytes a row, so a million rows is ~20 MB in memory). The latents are not read: each batch's z_t
is rebuilt from the dataset's own stored spec (``_geomjobs/spec.yaml``, the resolved spec the job
ran), exactly as the job's engine saw it: ``LatentSource.latents(ids)`` of the spec's ``latents``
section (forward diffusion included: images' z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps with
the job's own eps and t), cast to the job's ``execution.dtype`` (the engine casts on the host
before the step). Where the dataset has a ``z`` column (generated latents with ``save_latent``),
z is read from it instead (cast the same way), and held in memory as float32: such datasets are
small (every row is a sampler run).

Each record's t is ``diffusion_t`` (images forward-diffused to t), else ``timestep`` (the
denoiser's timestep: trajectory records' own, or the job's ``model.timestep``), else 0 (a clean
latent). Timesteps are in the diffusion model's units, 0..T-1.

The held-out split is by sample id: ``split_unit(sample_id) < val_fraction`` with a fixed 64-bit
mix of the id, so it is stable across runs, machines and datasets; datasets of the same images
under different noise draws (same sample ids) put the same images in the held-out set, so no
image is seen in training under another noise draw.
"""
from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.latents import build_latents
from geomjobs.sink.dataset import Dataset
from geomjobs.sink.fs import join

T_DEFAULT = 1000     # num_train_timesteps where a dataset names no diffusion schedule
INDEX_COLUMNS = ("sample_id", "status", "diffusion_t", "timestep")


def split_unit(ids) -> np.ndarray:
    """A stable uniform number in [0, 1) per sample id (splitmix64's finaliser of the id)."""
    x = np.asarray(ids, np.uint64).copy()
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15))
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _err(uri: str, why: str) -> SpecError:
    return SpecError("DATASET", f"'{uri}': {why}")


def part_files(ds: Dataset) -> list[str]:
    """Paths (inside ds.fs) of the committed part files, in shard order: only files with a commit marker."""
    return [join(ds.root, m["file"]) for _, m in sorted(ds.committed().items())]


def open_parts(ds: Dataset):
    import pyarrow.dataset as pds

    files = part_files(ds)
    return pds.dataset(files, filesystem=ds.fs, format="parquet") if files else None


def read_index(ds: Dataset, target: str) -> pa.Table:
    """sample_id, t (float64) and the target of the ok rows whose target is not null, by column projection."""
    parts = open_parts(ds)
    if parts is None:
        raise _err(ds.uri, "has no committed shards (run or --resume the job first)")
    names = parts.schema.names
    if target not in names:
        raise _err(ds.uri, f"has no column '{target}' (--target); its columns are {names}")
    cols = [c for c in INDEX_COLUMNS if c in names] + [target]
    ok = pc.field("status") == "ok"
    tab = parts.to_table(columns=cols, filter=ok)
    if tab.num_rows == 0:
        raise _err(ds.uri, "has no rows with status 'ok'")
    y = tab.column(target)
    if not (pa.types.is_floating(y.type) or pa.types.is_integer(y.type)):
        raise _err(ds.uri, f"column '{target}' holds {y.type}, not numbers")
    tab = tab.filter(pc.is_valid(y))
    if tab.num_rows == 0:
        raise _err(ds.uri, f"column '{target}' is null in every ok row (the job did not compute it)")
    given = [tab.column(c).cast(pa.float64()) for c in ("diffusion_t", "timestep") if c in tab.column_names]
    t = pc.coalesce(*given, pa.scalar(0.0)) if given else pa.array(np.zeros(tab.num_rows), pa.float64())
    return pa.table({"sample_id": tab.column("sample_id").cast(pa.int64()), "t": t,
                     "y": tab.column(target).cast(pa.float64())})


@dataclasses.dataclass
class RewardSource:
    """One dataset's training rows (index columns in memory, latents rebuilt on demand)."""
    uri: str
    job: dict
    spec: dict
    dtype: str                      # the job's execution.dtype: what the engine cast z to
    latent_shape: tuple
    num_train_timesteps: int
    ids: np.ndarray                 # (n,) int64 sample ids of the usable rows, ascending
    t: np.ndarray                   # (n,) float64
    y: np.ndarray                   # (n,) float64
    origin: str                     # "spec" (rebuilt) | "z column"
    latents: object = dataclasses.field(default=None, repr=False)     # LatentSource, for origin "spec"
    z_column: np.ndarray | None = dataclasses.field(default=None, repr=False)   # (n, d) in dtype, origin "z column"
    # latent sources keep caches (encoded blocks, the last sampler run): one caller at a time
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def spec_hash(self) -> str:
        return self.job.get("spec_hash", "")

    def z_job(self, rows: np.ndarray) -> np.ndarray:
        """The latents the job's generator saw for rows ``rows`` (indices into ``ids``),
        (len(rows), *latent_shape) in the job's execution dtype."""
        rows = np.asarray(rows, np.int64)
        if self.origin == "z column":
            return self.z_column[rows].reshape(len(rows), *self.latent_shape)
        with self._lock:
            z = self.latents.latents(self.ids[rows])
        return np.asarray(np.asarray(z, np.float64).reshape(len(rows), -1), _np_dtype(self.dtype)).reshape(len(rows), *self.latent_shape)

    def z(self, rows: np.ndarray) -> np.ndarray:
        """:meth:`z_job` as float32 (what the reward network trains on)."""
        return np.asarray(self.z_job(rows), np.float32)


def _np_dtype(name: str):
    import jax.numpy as jnp

    return jnp.dtype(name)


def _num_timesteps(spec: dict, latents) -> int:
    lat = spec["latents"]
    if lat.get("diffuse"):
        return int(lat["diffuse"].get("schedule", {}).get("T", T_DEFAULT))
    run = getattr(latents, "run", None)        # sampled / trajectory: the sampling model's
    if run is not None:
        return int(run.gen.denoiser.num_timesteps)
    if "timestep" in spec.get("model", {}):    # a denoiser at a fixed timestep: its own schedule
        gen = build_generator(spec["model"], spec["execution"]["dtype"])
        if gen.denoiser is not None:
            return int(gen.denoiser.num_timesteps)
    return T_DEFAULT


def _z_column(ds: Dataset, ids: np.ndarray, dtype: str) -> np.ndarray | None:
    """The ``z`` column of the rows ``ids`` (ascending) as (n, d) in dtype, or None when the
    column is absent or null."""
    parts = open_parts(ds)
    if "z" not in parts.schema.names:
        return None
    first = parts.to_table(columns=["z"], filter=pc.field("sample_id") == int(ids[0])).column("z")
    if len(first) == 0 or first.null_count == len(first):
        return None
    tab = parts.to_table(columns=["sample_id", "z"], filter=pc.field("status") == "ok").sort_by("sample_id")
    sid = tab.column("sample_id").to_numpy()
    keep = np.isin(sid, ids)
    z = tab.column("z").filter(pa.array(keep)).combine_chunks()
    if z.null_count:
        raise _err(ds.uri, "its 'z' column is null in some ok rows")
    d = len(z[0].as_py())
    flat = np.asarray(z.flatten().to_numpy(zero_copy_only=False), np.float64)
    if len(flat) != d * len(ids):
        raise _err(ds.uri, "its 'z' column holds latents of different lengths")
    return np.asarray(flat.reshape(len(ids), d), _np_dtype(dtype))


def open_source(uri: str, target: str, *, use_z_column: bool = True) -> RewardSource:
    """One dataset checked and indexed, before any training: SpecError naming it for anything
    that makes it unusable (missing, no ok rows, no target, latents that cannot be rebuilt).
    ``use_z_column=False`` rebuilds z from the spec even where a ``z`` column exists (tests)."""
    ds = Dataset(uri)
    try:
        present = ds.exists()
    except Exception as e:   # noqa: BLE001 - an unreachable bucket, a bad URI
        raise _err(uri, f"cannot be read ({type(e).__name__}: {e})") from None
    if not present:
        raise _err(ds.uri, "is not a geomjobs dataset (no _geomjobs/job.json there)")
    try:
        job, spec = ds.job(), ds.spec()
    except Exception as e:   # noqa: BLE001 - a truncated or unreadable card
        raise _err(ds.uri, f"its _geomjobs/job.json or spec.yaml cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("latents"), dict):
        raise _err(ds.uri, "its stored spec (_geomjobs/spec.yaml) has no 'latents' section to rebuild the latents from")
    index = read_index(ds, target)
    order = np.argsort(index.column("sample_id").to_numpy(), kind="stable")
    ids = index.column("sample_id").to_numpy()[order]
    t = index.column("t").to_numpy()[order]
    y = index.column("y").to_numpy()[order]
    if not np.all(np.isfinite(y)):
        keep = np.isfinite(y)
        ids, t, y = ids[keep], t[keep], y[keep]
    dtype = spec.get("execution", {}).get("dtype", "float32")
    zcol = _z_column(ds, ids, dtype) if use_z_column else None
    latents, why = None, None
    try:
        latents = build_latents(spec["latents"])
    except SpecError as e:
        why = str(e)
    except Exception as e:   # noqa: BLE001 - a python source gone, a file moved: say why
        why = f"{type(e).__name__}: {e}"
    if zcol is None:
        if latents is None:
            raise _err(ds.uri, f"its latents cannot be rebuilt from its spec ({why}) and it has no 'z' column")
        shape = tuple(int(s) for s in latents.shape)
        try:   # one small rebuild now, so a source that fails on use fails before training
            z0 = np.asarray(latents.latents(ids[:1]), np.float64)
        except Exception as e:   # noqa: BLE001
            raise _err(ds.uri, f"its latents cannot be rebuilt from its spec ({type(e).__name__}: {e})") from None
        if z0.shape != (1, *shape):
            raise _err(ds.uri, f"its latent source gives {list(z0.shape[1:])}, its shape says {list(shape)}")
        T = _num_timesteps(spec, latents)
        return RewardSource(ds.uri, job, spec, dtype, shape, T, ids, t, y, "spec", latents=latents)
    shape = tuple(int(s) for s in latents.shape) if latents is not None else (zcol.shape[1],)
    if math.prod(shape) != zcol.shape[1]:
        raise _err(ds.uri, f"its 'z' column holds {zcol.shape[1]} values a row, its latent shape is {list(shape)}")
    T = _num_timesteps(spec, latents) if latents is not None else T_DEFAULT
    return RewardSource(ds.uri, job, spec, dtype, shape, T, ids, t, y, "z column", z_column=zcol)


def open_sources(uris: list[str], target: str) -> list[RewardSource]:
    """Every dataset opened and checked against the others (same latent shape, same T)."""
    sources = [open_source(u, target) for u in uris]
    first = sources[0]
    for s in sources[1:]:
        if s.latent_shape != first.latent_shape:
            raise _err(s.uri, f"has latents of shape {list(s.latent_shape)}, but '{first.uri}' has "
                              f"{list(first.latent_shape)}; one reward model takes one latent shape")
        if s.num_train_timesteps != first.num_train_timesteps:
            raise _err(s.uri, f"counts T = {s.num_train_timesteps} diffusion timesteps, '{first.uri}' "
                              f"T = {first.num_train_timesteps}; timesteps in different units cannot be mixed")
    return sources
