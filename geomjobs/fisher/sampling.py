"""The sampling stage of a fisher run: an ordinary geomjobs job (``OUT/samples/``).

Its rows are the grid points: ``sample_id`` (the point's index p, theta_1 index major),
``status``, ``theta_1``, ``theta_2``, ``x`` (the point's ``samples_per_point`` samples, flattened:
int8 spins or occupations, float32 images; the shape is in ``_geomjobs/job.json``) and the exact
references ``exact_F``, ``exact_dF_1``, ``exact_dF_2``, ``exact_g_11``, ``exact_g_12``,
``exact_g_22`` (null where the family has none). Shards of ``execution.shard_size`` points run
through the runner the descriptor jobs use (:mod:`geomjobs.runner.local`, or the Ray pool of
:mod:`geomjobs.runner.ray_driver` with ``address``): commit markers, resume by markers, the retry
policy (``execution.max_retries``), failure records, worker replacement, ``geomjobs inspect``.

The job's spec holds only what decides the samples (the family's resolved settings, the grid,
``samples_per_point``, ``seed``, ``execution.shard_size``), so a fisher run with other posterior,
potential or geodesic settings reuses them; another family, grid, seed, sample count or shard
size in the same folder is refused. A point's samples depend only on (seed, its grid index) (the
family's contract), never on the sharding.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from geomjobs.errors import SpecError
from geomjobs.fisher.spec import grid_thetas
from geomjobs.runner.job import ShardedJob
from geomjobs.sink.fs import join
from geomjobs.spec import spec_hash

TABLE = "fisher-samples"
TABLE_VERSION = 1
EXACT_COLUMNS = ("exact_F", "exact_dF_1", "exact_dF_2", "exact_g_11", "exact_g_12", "exact_g_22")


class SamplingError(RuntimeError):
    """Shards of the sampling stage failed after their retries (recorded in the samples dataset);
    nothing was fitted. Committed shards are kept: a rerun computes the others."""


def samples_uri(out: str) -> str:
    return join(out, "samples")


def samples_spec(spec: dict) -> dict:
    """The sampling job's spec from a validated fisher spec: what decides the samples, and how
    to run them (``execution``: ``shard_size``, and the run-only ``max_retries`` and ``workers``)."""
    execution = {k: spec["execution"][k] for k in ("shard_size", "max_retries", "workers") if k in spec["execution"]}
    s = {"family": spec["family"], "grid": {k: spec["grid"][k] for k in ("low", "high", "resolution")},
         "samples_per_point": spec["samples_per_point"], "seed": spec["seed"], "execution": execution}
    s["job_id"] = f"{spec['job_id']}-samples" if spec.get("job_id") else f"{TABLE}-{spec_hash(s)[:12]}"
    return s


@dataclasses.dataclass(frozen=True)
class SamplesPlan(ShardedJob):
    """The sampling job as the drivers see it (:class:`geomjobs.runner.job.ShardPlan`)."""
    spec: dict
    family: object = dataclasses.field(compare=False)

    @property
    def count(self) -> int:
        return math.prod(self.spec["grid"]["resolution"])

    @property
    def planner(self) -> Callable[[dict], SamplesPlan]:
        return plan_samples

    def artifacts(self) -> dict:
        return {}

    def card(self) -> dict:
        f = self.family
        return {"table": TABLE, "table_version": TABLE_VERSION, "model_id": f"{TABLE}:{f.kind}", "theta_names": list(f.theta_names),
                "samples_per_point": self.spec["samples_per_point"], "sample_shape": list(f.sample_shape),
                "sample_dtype": f.sample_dtype}

    def make_engine(self) -> SamplesEngine:
        return SamplesEngine(self)


def plan_samples(spec: dict) -> SamplesPlan:
    """The plan of a sampling job's spec (how a Ray worker rebuilds the driver's)."""
    from geomjobs.fisher.families import build_family

    return SamplesPlan(spec, build_family(spec["family"]))


class SamplesEngine:
    """Samples a shard's grid points and their exact references (:class:`geomjobs.runner.job.ShardEngine`)."""

    def __init__(self, plan: SamplesPlan):
        self.plan = plan
        self.thetas = grid_thetas(plan.spec)

    def compute_shard(self, shard: int) -> pa.Table:
        plan, fam = self.plan, self.plan.family
        idx = plan.shard_ids(shard)
        # every shard is sampled at shard_size points (the last one padded with copies of its last
        # point, dropped after) so the jitted samplers compile once; a point's samples depend only
        # on (seed, its index), so the copies change nothing
        pad = np.concatenate([idx, np.full(plan.shard_size - len(idx), idx[-1])])
        x = np.asarray(fam.sample(self.thetas[pad], plan.spec["samples_per_point"], plan.spec["seed"], index=pad))[:len(idx)]
        th = self.thetas[idx]
        per = math.prod(x.shape[1:])
        cols = {"sample_id": pa.array(idx, pa.int64()), "status": pa.array(["ok"] * len(idx), pa.string()),
                "theta_1": pa.array(th[:, 0]), "theta_2": pa.array(th[:, 1]),
                "x": pa.ListArray.from_arrays(pa.array(np.arange(len(idx) + 1, dtype=np.int32) * per), pa.array(x.reshape(-1)))}
        ex = fam.exact(th)
        vals = [None] * len(EXACT_COLUMNS) if ex is None else \
            [ex["F"], ex["dF"][:, 0], ex["dF"][:, 1], ex["g"][:, 0, 0], ex["g"][:, 0, 1], ex["g"][:, 1, 1]]
        for name, v in zip(EXACT_COLUMNS, vals):
            cols[name] = pa.nulls(len(idx), pa.float64()) if v is None else pa.array(np.asarray(v, np.float64))
        return pa.table(cols)

    def describe(self) -> dict:
        import jax

        d = self.plan.family.describe()
        settings = ", ".join(f"{k} {v}" for k, v in d.items() if k != "kind" and not isinstance(v, (list, dict)))
        n = self.plan.spec["samples_per_point"]
        return {"display": f"{d['kind']} sampler ({settings}), {n} samples per grid point", "family": d,
                "devices": len(jax.local_devices())}


def sample_grid(spec: dict, family, out: str, *, address: str | None = None, progress: bool = True) -> dict:
    """Run the sampling job of a validated fisher spec into ``OUT/samples`` (resuming it when it is
    there): in process, or on the Ray cluster at ``address`` ("local": an embedded Ray). Returns
    {"computed": shards computed by this run, "shards": total}. SpecError (exit 2) when the folder
    holds another sampling job; :class:`SamplingError` when shards failed after their retries."""
    from geomjobs.runner.job import open_job
    from geomjobs.sink.dataset import DatasetError

    uri = samples_uri(out)
    plan = SamplesPlan(samples_spec(spec), family)
    try:
        job = open_job(plan, uri)
    except DatasetError as e:
        raise SpecError("output", f"'{out}' holds samples of another fisher job ({e}); use a new output folder") from None
    if address is None:
        from geomjobs.runner.local import drive_local

        res = drive_local(job, progress)
    else:
        from geomjobs.runner.ray_driver import drive_ray

        res = drive_ray(job, address, progress)
    if not res.ok:
        raise SamplingError(failure_message(uri, res))
    out = {"computed": res.computed_shards, "shards": res.num_shards}
    if res.worker_deaths:
        out["worker_deaths"] = res.worker_deaths
    return out


def failure_message(uri: str, res) -> str:
    """What a sampling job that did not finish says: its failed shards, each with its failure record."""
    from geomjobs.sink.dataset import Dataset

    failures = Dataset(uri).failures()
    lines = [f"the sampling job at {uri} did not finish: {len(res.failed_shards)} of {res.num_shards} shards failed after "
             f"their retries, nothing was fitted"]
    for k in res.failed_shards[:5]:
        rec = failures.get(k, {})
        lines.append(f"  shard {k}: {rec.get('error', '?')} ({rec.get('attempts', '?')} attempts; failure record "
                     f"{join(uri, '_geomjobs', 'failures', f'{k:06d}.json')})")
    lines.append(f"committed shards are kept: `geomjobs inspect {uri}`; rerun the same command to compute the others")
    return "\n".join(lines)


def load_samples(out: str) -> dict:
    """The samples of a finished sampling job: {"x": (P, n, *sample_shape), "thetas": (P, 2),
    "exact": {"F", "dF", "g"} | None}."""
    from geomjobs.sink.dataset import Dataset

    ds = Dataset(samples_uri(out))
    job = ds.job()
    t = ds.read_table()
    if t.num_rows != job["count"]:
        raise SamplingError(f"{ds.uri} holds {t.num_rows} of its {job['count']} grid points")
    x = t.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    x = x.reshape(t.num_rows, job["samples_per_point"], *job["sample_shape"])
    col = {c: t.column(c).to_numpy(zero_copy_only=False) for c in ("theta_1", "theta_2", *EXACT_COLUMNS)}
    exact = None
    if t.column("exact_F").null_count == 0:
        g12 = col["exact_g_12"]
        exact = {"F": col["exact_F"], "dF": np.stack([col["exact_dF_1"], col["exact_dF_2"]], -1),
                 "g": np.stack([np.stack([col["exact_g_11"], g12], -1), np.stack([g12, col["exact_g_22"]], -1)], -2)}
    return {"x": x, "thetas": np.stack([col["theta_1"], col["theta_2"]], -1), "exact": exact}
