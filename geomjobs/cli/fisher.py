"""``geomjobs fisher SPEC.yaml [--out URI] [--address ADDR] [-q]``: the arguments in,
:func:`geomjobs.fisher.job.run_fisher` (imported when the command runs), its summary out
(:func:`geomjobs.fisher.job.summary_lines`). Exit 0; 1 when sample shards failed after their
retries (each named with its failure record); 2 on a bad spec or output folder."""
from __future__ import annotations

import sys


def _fisher(args) -> int:
    from geomjobs.fisher.job import run_fisher, summary_lines
    from geomjobs.fisher.sampling import SamplingError
    from geomjobs.fisher.spec import load_fisher_spec

    spec, family = load_fisher_spec(args.spec)
    try:
        summary = run_fisher(spec, args.out, address=args.address, progress=not args.quiet, family=family)
    except SamplingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(summary_lines(summary)))
    return 0


def add_parsers(sub) -> None:
    f = sub.add_parser("fisher", help="the Fisher metric of a 2-D family on a theta grid (Ising, TASEP, diffusion slice)",
                       description="Running the same spec again into the same output resumes the sampling job and "
                                   "refits; a folder holding other samples is refused.")
    f.add_argument("spec", help="fisher spec (YAML); see docs/fisher.md")
    f.add_argument("--out", help="output folder URI (overrides the spec's 'output')")
    f.add_argument("--address", help="Ray cluster address for the sampling job, or 'local' for an embedded Ray "
                                     "(default: in process)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(fn=_fisher)
