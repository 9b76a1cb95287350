"""Run a reward-data spec once per noise draw: the same images, eps and t drawn from
(latents.diffuse.seed = draw, sample_id), one dataset per draw under OUT/draw-<k>.

    python examples/reward/reward_data.py examples/reward/vae-digits.yaml --draws 4 --out out/reward-data/vae-digits
    geomjobs reward train out/reward-data/vae-digits/draw-* --out out/rewards/vae-digits

Draws already complete are skipped (resume finishes a partial one)."""
from __future__ import annotations

import argparse
import copy
import sys

from geomjobs import run_job
from geomjobs.sink.dataset import Dataset
from geomjobs.spec import load_spec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a reward-data spec with latents.diffuse (examples/reward/*.yaml)")
    ap.add_argument("--draws", type=int, default=4, help="noise draws: diffuse.seed = 0..DRAWS-1 (default 4)")
    ap.add_argument("--out", required=True, help="folder for the datasets draw-0 .. draw-(DRAWS-1) (local or gs://)")
    ap.add_argument("--count", type=int, help="images per draw (default: every image of the source)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    base = load_spec(args.spec)
    if "diffuse" not in base["latents"]:
        ap.error(f"{args.spec}: latents.diffuse is missing; a noise draw is a diffuse.seed")
    for k in range(args.draws):
        spec = copy.deepcopy(base)
        spec["latents"]["diffuse"]["seed"] = k
        spec["job_id"] = f"{base.get('job_id', 'reward-data')}-draw-{k}"
        if args.count is not None:
            spec["latents"]["count"] = args.count
        out = f"{args.out.rstrip('/')}/draw-{k}"
        ds = Dataset(out)
        resume = ds.exists()
        res = run_job(spec, out, resume=resume, progress=not args.quiet)
        print(f"draw {k}: {out} ({res.rows} rows{', resumed' if resume else ''})")
        if not res.ok:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
