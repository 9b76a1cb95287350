"""``geomjobs submit``, ``status`` and ``logs``: a job on a Ray cluster through the Ray Jobs API
(:mod:`geomjobs.jobs_api`)."""
from __future__ import annotations

import argparse
import json
import sys


def _submit(args) -> int:
    from geomjobs import jobs_api

    res = jobs_api.submit(args.spec, args.address, out=args.out, submission_id=args.submission_id,
                          local_check=args.local_check)
    if res.job_id is None:
        print(f"{res.output} already holds this job, complete: nothing submitted", file=sys.stderr)
        return 0
    print(res.job_id)
    return 0


def _status(args) -> int:
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


def _logs(args) -> int:
    from geomjobs import jobs_api

    if args.follow:
        jobs_api.follow_logs(args.job_id, args.address)
    else:
        print(jobs_api.logs(args.job_id, args.address), end="")
    return 0


def add_parsers(sub) -> None:
    addr_help = "Ray Jobs API address http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)"
    job_help = "the job id `geomjobs submit` printed"
    s = sub.add_parser("submit", help="submit a job to a Ray cluster through the Ray Jobs API; prints the job id",
                       description="Check the spec here as `geomjobs run` would (model, latents, output), check that "
                                   "the cluster can run geomjobs, then submit. The head must have been started from "
                                   "an environment with geomjobs installed (docs/ray.md).")
    s.add_argument("spec", help="job spec (YAML); local files it names are sent with the job")
    s.add_argument("--address", help=addr_help)
    s.add_argument("--out", help="output dataset URI (overrides the spec's 'output'; use gs:// for a remote cluster)")
    s.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)   # accepted from older scripts: always on
    s.add_argument("--submission-id", help="Ray submission id (default: generated)")
    s.add_argument("--no-local-check", dest="local_check", action="store_false",
                   help="skip planning the job on this machine (for model paths only the cluster can read)")
    s.set_defaults(fn=_submit)
    st = sub.add_parser("status", help="status of a submitted job and its dataset's progress")
    st.add_argument("job_id", help=job_help)
    st.add_argument("--address", help=addr_help)
    st.add_argument("--wait", action="store_true", help="wait until the job ends; exit 0 only if it succeeded")
    st.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(fn=_status)
    lg = sub.add_parser("logs", help="logs of a submitted job")
    lg.add_argument("job_id", help=job_help)
    lg.add_argument("--address", help=addr_help)
    lg.add_argument("-f", "--follow", action="store_true", help="stream the logs until the job ends")
    lg.set_defaults(fn=_logs)
