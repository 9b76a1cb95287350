"""``geomjobs run`` and ``geomjobs inspect``."""
from __future__ import annotations

import argparse
import json
import sys


def _run(args) -> int:
    from geomjobs import run_job
    from geomjobs.spec import load_spec

    res = run_job(load_spec(args.spec), args.out, progress=not args.quiet, address=args.address)
    if res.computed_shards == 0 and res.ok:
        print(f"{res.job_id}: already complete at {res.uri} ({res.rows} rows, {res.num_shards} shards); nothing to compute")
        return 0
    print(f"{res.job_id}: {res.rows}/{res.count} rows in {res.committed_shards}/{res.num_shards} shards at {res.uri} "
          f"({res.computed_shards} shards computed in {res.seconds:.1f} s)")
    if res.worker_deaths:
        print(f"  {res.worker_deaths} worker deaths during the job; {res.workers_replaced} replacement workers joined it")
    if res.errors:
        print(f"  {res.errors} samples have status 'error' (see: geomjobs inspect {res.uri})", file=sys.stderr)
    if res.failed_shards:
        print(f"  {len(res.failed_shards)} shards failed: {res.failed_shards[:20]}", file=sys.stderr)
    return res.exit_code


def engine_line(e: dict) -> str:
    """One engine of ``Summary.engines()``: its own ``display`` (written by the engine that
    computed the shards), or, for markers written before engines had one, its settings."""
    text = e.get("display") or ", ".join(f"{k} {v}" for k, v in e.items() if k != "shards")
    return f"{text}: {e['shards']} shards"


def _inspect(args) -> int:
    import yaml

    from geomjobs.errors import DatasetError
    from geomjobs.sink.dataset import Dataset

    ds = Dataset(args.uri)
    if not ds.exists():
        raise DatasetError(f"'{ds.uri}' is not a geomjobs dataset (no _geomjobs/job.json)")
    s = ds.summary()
    job = s.job
    info = {"uri": ds.uri, "job_id": job["job_id"], "schema_version": job["schema_version"],
            "model_id": job.get("model_id"), "samples": job["count"], "rows": s.rows, "error_rows": s.errors,
            "shards": {"total": job["num_shards"], "committed": len(s.committed), "failed": len(s.failures),
                       "pending": s.pending},
            "failures": [{"shard": k, "attempts": v.get("attempts"), "error": v["error"]} for k, v in sorted(s.failures.items())],
            "engines": s.engines()}
    if args.json:
        info["spec"] = ds.spec()
        print(json.dumps(info, indent=2))
        return 0
    print(f"dataset        {info['uri']}")
    print(f"job            {info['job_id']}  (model {info['model_id']}, record schema v{info['schema_version']})")
    print(f"rows           {s.rows} of {job['count']} samples ({s.errors} with status 'error')")
    sh = info["shards"]
    print(f"shards         {sh['committed']} committed, {sh['failed']} failed, {sh['pending']} pending, of {sh['total']}")
    for f in info["failures"]:
        print(f"  failed shard {f['shard']} after {f['attempts']} attempts: {f['error']}")
    for e in info["engines"]:
        print(f"engine         {engine_line(e)}")
    if s.errors and args.errors:
        df = ds.read_table().to_pandas()
        for _, r in df[df.status != "ok"].head(args.errors).iterrows():
            print(f"  sample {r.sample_id}: {r.error}")
    print("spec:")
    print("  " + yaml.safe_dump(ds.spec(), sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="run a job and wait (local mode, or on a Ray cluster with --address)",
                       description="Run a job spec. Running the same spec again into the same output finishes "
                                   "what is missing (nothing, when the job is complete); an output holding a "
                                   "different job is refused.")
    r.add_argument("spec", help="job spec (YAML); see docs/jobs.md")
    r.add_argument("--out", help="output dataset URI, local or gs:// (overrides the spec's 'output')")
    r.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)   # accepted from older scripts: always on
    r.add_argument("--address", help="Ray cluster address HOST:PORT, or 'auto' inside a Ray job (default: local mode)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=_run)
    i = sub.add_parser("inspect", help="print a dataset's rows, shards, failures, schema version and spec")
    i.add_argument("uri", help="dataset URI (local or gs://) written by geomjobs run or fisher (its samples/)")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--errors", type=int, default=10, metavar="N", help="list up to N samples with status 'error'")
    i.set_defaults(fn=_inspect)
