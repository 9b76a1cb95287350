"""The ``geomjobs`` command line: parse, call a library function, map results to exit codes.

Exit codes: 0 every sample has an 'ok' row; 1 the job ran but some samples or shards failed;
2 the spec (or a file it names, or the output location) is unusable — nothing was computed.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml


def _cmd_run(args) -> int:
    from geomjobs import run_job
    from geomjobs.spec import load_spec

    spec = load_spec(args.spec)
    res = run_job(spec, args.out, resume=args.resume, progress=not args.quiet, address=args.address)
    print(f"{res.job_id}: {res.rows}/{res.count} rows in {res.committed_shards}/{res.num_shards} shards at {res.uri} "
          f"({res.computed_shards} shards computed in {res.seconds:.1f} s)")
    if res.worker_deaths:
        print(f"  {res.worker_deaths} worker deaths during the job; {res.workers_replaced} replacement workers joined it")
    if res.errors:
        print(f"  {res.errors} samples have status 'error' (see: geomjobs inspect {res.uri})", file=sys.stderr)
    if res.failed_shards:
        print(f"  {len(res.failed_shards)} shards failed: {res.failed_shards[:20]}", file=sys.stderr)
    return res.exit_code


def _cmd_inspect(args) -> int:
    from geomjobs.sink.dataset import Dataset

    ds = Dataset(args.uri)
    if not ds.exists():
        print(f"error: '{ds.uri}' is not a geomjobs dataset (no _geomjobs/job.json)", file=sys.stderr)
        return 2
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
        mem = "" if e.get("xla_memory_bytes") is None else f", XLA memory plan {e['xla_memory_bytes'] / 2**30:.2f} GiB"
        how = f"local_scaling mode {e['mode']}" if e.get("mode") else "no local_scaling"
        if e.get("mode") in ("projection", "slq"):
            how += ", " + ("all rows in one pass" if e.get("chunk") is None else f"chunks of {e['chunk']}")
        print(f"engine         {how}{mem}, {e['devices']} device(s): {e['shards']} shards")
    if s.errors and args.errors:
        df = ds.read_table().to_pandas()
        for _, r in df[df.status != "ok"].head(args.errors).iterrows():
            print(f"  sample {r.sample_id}: {r.error}")
    print("spec:")
    print("  " + yaml.safe_dump(ds.spec(), sort_keys=False).replace("\n", "\n  ").rstrip())
    return 0


def _cmd_submit(args) -> int:
    from geomjobs import jobs_api

    job_id = jobs_api.submit(args.spec, args.address, out=args.out, resume=args.resume,
                             submission_id=args.submission_id)
    print(job_id)
    return 0


def _cmd_status(args) -> int:
    from geomjobs import jobs_api

    st = jobs_api.wait(args.job_id, args.address, timeout=args.timeout) if args.wait else \
        jobs_api.status(args.job_id, args.address)
    if args.json:
        print(json.dumps(st, indent=2))
    else:
        print(f"{st['job_id']}  {st['status']}" + (f"  {st['message']}" if st.get("message") else ""))
        p = st.get("progress")
        if p:
            print(f"  {st['output']}: {p['committed']}/{p['shards']} shards committed, "
                  f"{p['failed']} failed, {p['rows']}/{p['samples']} rows")
    if args.wait:
        return 0 if st["status"] == "SUCCEEDED" else 1
    return 0


def _cmd_logs(args) -> int:
    from geomjobs import jobs_api

    if args.follow:
        jobs_api.follow_logs(args.job_id, args.address)
    else:
        print(jobs_api.logs(args.job_id, args.address), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomjobs", description="Local geometry of generative models, as batch jobs.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job and wait (local mode, or on a Ray cluster with --address)")
    r.add_argument("spec", help="job spec (YAML)")
    r.add_argument("--out", help="output dataset URI (overrides the spec's 'output')")
    r.add_argument("--resume", action="store_true", help="finish a job in --out, skipping committed shards")
    r.add_argument("--address", help="Ray cluster address HOST:PORT, or 'auto' inside a Ray job (default: local mode)")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    r.set_defaults(fn=_cmd_run)
    i = sub.add_parser("inspect", help="print a dataset's rows, shards, failures, schema version and spec")
    i.add_argument("uri")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.add_argument("--errors", type=int, default=10, metavar="N", help="list up to N samples with status 'error'")
    i.set_defaults(fn=_cmd_inspect)
    addr_help = "Ray Jobs API address http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
    s = sub.add_parser("submit", help="submit a job to a Ray cluster through the Ray Jobs API; prints the job id")
    s.add_argument("spec", help="job spec (YAML)")
    s.add_argument("--address", help=addr_help)
    s.add_argument("--out", help="output dataset URI (overrides the spec's 'output'; use gs:// for a remote cluster)")
    s.add_argument("--resume", action="store_true", help="finish a job in --out, skipping committed shards")
    s.add_argument("--submission-id", help="Ray submission id (default: generated)")
    s.set_defaults(fn=_cmd_submit)
    st = sub.add_parser("status", help="status of a submitted job and its dataset's progress")
    st.add_argument("job_id")
    st.add_argument("--address", help=addr_help)
    st.add_argument("--wait", action="store_true", help="wait until the job ends; exit 0 only if it succeeded")
    st.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=_cmd_status)
    lg = sub.add_parser("logs", help="logs of a submitted job")
    lg.add_argument("job_id")
    lg.add_argument("--address", help=addr_help)
    lg.add_argument("-f", "--follow", action="store_true", help="stream the logs until the job ends")
    lg.set_defaults(fn=_cmd_logs)
    from geomjobs.fisher.cli import add_parser as add_fisher
    from geomjobs.reward.cli import add_parser as add_reward

    add_reward(sub)
    add_fisher(sub)
    return p


def main(argv=None) -> int:
    from geomjobs.runner.ray_connect import WorkerPoolError
    from geomjobs.sink.dataset import DatasetError
    from geomjobs.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerPoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # e.g. `geomjobs inspect URI | head`: the reader is gone, not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; rerun with --resume to finish", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
