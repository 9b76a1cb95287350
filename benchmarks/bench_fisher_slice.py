"""Fisher slice at scale (issue 20): the wall time of `geomjobs fisher` on a diffusion slice
(examples/fisher/ldm-digits-slice-128.yaml's settings at ``--resolution`` R x R points and
``--samples`` per point) split by stage -- sampling (the sharded runner job), posterior (the
windowed feature log-likelihoods and bundle posteriors), F (the windowed shape fit), metric (the
spline's Hessian on the grid) and the slice outputs (eta = 0 classes, psi job, class map,
statistics, figures) -- in process and on 2 local Ray workers (``--address local``, execution.workers 2),
and the wall time of the Ising L = 8 learned pipeline (examples/fisher/ising-L8-learned.yaml).

Run alone:
    .venv/bin/python benchmarks/bench_fisher_slice.py [--resolution 128] [--samples 16] [--no-ray] [--no-ising]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import table

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ["--resolution", "6", "--samples", "4", "--class-map", "0", "--no-psi", "--no-ray", "--no-ising"]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--class-map", type=int, default=256, help="side of the eta = 0 class map for box counting (0: none)")
    ap.add_argument("--psi", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="also on 2 local Ray workers")
    ap.add_argument("--ising", action=argparse.BooleanOptionalAction, default=True, help="also the Ising L=8 learned pipeline")
    return ap.parse_args(argv)


def slice_spec(args) -> dict:
    raw = yaml.safe_load((ROOT / "examples" / "fisher" / "ldm-digits-slice-128.yaml").read_text())
    raw["grid"]["resolution"] = [args.resolution, args.resolution]
    raw["samples_per_point"] = args.samples
    raw["family"]["psi"] = args.psi
    raw["family"]["class_map"] = args.class_map or None
    raw["execution"]["shard_size"] = max(1, min(128, args.resolution ** 2 // 8))
    raw.pop("output")
    return raw


def timed(raw: dict, address: str | None) -> dict:
    from geomjobs.fisher.job import run_fisher

    with tempfile.TemporaryDirectory() as out:
        t = time.time()
        s = run_fisher(copy.deepcopy(raw), out, address=address, progress=False)
        s["wall"] = time.time() - t
    return s


def run(args) -> str:
    raw = slice_spec(args)
    runs = [("in process", None)] + ([("2 local Ray workers", "local")] if args.ray else [])
    rows = []
    for name, address in runs:
        r = copy.deepcopy(raw)
        if address:
            r["execution"]["workers"] = 2
        s = timed(r, address)
        rows.append([name, f"{s['sample_seconds']:.1f}", f"{s['posterior_seconds']:.1f}", f"{s['potential_seconds']:.1f}",
                     f"{s['metric_seconds']:.1f}", f"{s['family_outputs_seconds']:.1f}", f"{s['wall']:.1f}"])
    R, n = args.resolution, args.samples
    lines = [f"Diffusion slice (ldm-digits, DDIM 25 steps eta 0.2, window {raw['posterior']['window']}, shape fit) at "
             f"{R} x {R} points, {n} samples per point ({R * R * n:,} generated samples), class map "
             f"{args.class_map or 'none'}, psi {'on' if args.psi else 'off'}; seconds per stage:", "",
             *table(["runner", "sampling", "posterior", "F", "metric", "slice outputs", "wall"], rows), ""]
    if args.ray:
        lines += ["The Ray run comes second in the same process: its posterior / F / metric stages reuse functions the "
                  "in-process run compiled, so the in-process row carries those compiles. Sampling is the sharded runner "
                  "job (on Ray: 2 workers, each compiling its own sampler); wall time also counts loading the samples "
                  "and the geodesics.", ""]
    if args.ising:
        raw_i = yaml.safe_load((ROOT / "examples" / "fisher" / "ising-L8-learned.yaml").read_text())
        raw_i.pop("output", None)
        s = timed(raw_i, None)
        g = raw_i["grid"]["resolution"]
        lines += [f"Ising L = 8, learned posterior (examples/fisher/ising-L8-learned.yaml: {g[0]} x {g[1]} grid, "
                  f"{raw_i['samples_per_point']} samples per point), in process:", "",
                  *table(["pipeline", "sampling", "posterior", "F", "metric", "wall"],
                         [["ising-L8-learned", f"{s['sample_seconds']:.1f}", f"{s['posterior_seconds']:.1f}",
                           f"{s['potential_seconds']:.1f}", f"{s['metric_seconds']:.1f}", f"{s['wall']:.1f}"]]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run(parse(sys.argv[1:])))
