"""The metric's error against the exact references, per fitting method and seed (docs/fisher.md's
error table): three cases (oracle Ising L = 4, learned Ising L = 8, learned TASEP L = 8), each
over seeds (the seed of the samples, the posterior network and the bundles), each with the F fits
(``potential.fit``: js, shape, curvature) on the same posteriors, and for the learned cases with
and without cross-fitting (``posterior.folds``). Printed beside what a zero metric (1.0) and the
best constant metric score on the same points.

Samples and posterior log-likelihoods are kept under ``--work`` (default out/fisher-metric-error),
so a rerun only fits. On a shared 2-core CPU: ~1 min for ising4, ~10 min for ising8 and ~25 min
for tasep8 at three seeds (mostly the cross-fitted posterior networks).

    python examples/fisher/metric_error.py [--cases ising4,ising8,tasep8] [--seeds 0,1,2] [--work DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

# the three cases of issue 20 item 1; "posteriors": the posterior variants compared
CASES = {
    "ising4": {"spec": {"family": {"kind": "ising", "L": 4}, "grid": {"low": [0.15, -0.25], "high": [0.55, 0.25], "resolution": [9, 9]},
                        "samples_per_point": 64, "posterior": {"kind": "oracle"}},
               "posteriors": {"oracle": {}}},
    "ising8": {"spec": {"family": {"kind": "ising", "L": 8}, "grid": {"low": [0.25, -0.1], "high": [0.45, 0.1], "resolution": [12, 12]},
                        "samples_per_point": 128, "posterior": {"kind": "learned", "bundle": 1, "steps": 2000}},
               "posteriors": {"holdout": {}, "folds4": {"folds": 4}, "folds4-fb128": {"folds": 4, "fit_bundle": 128}}},
    "tasep8": {"spec": {"family": {"kind": "tasep", "L": 8}, "grid": {"low": [0.1, 0.1], "high": [0.9, 0.9], "resolution": [10, 10]},
                        "samples_per_point": 512, "posterior": {"kind": "learned", "bundle": 1, "steps": 4000},
                        "potential": {"coords": "log"}},
               "posteriors": {"holdout": {}, "folds4": {"folds": 4}}},
}
FITS = ("js", "shape", "curvature")


def loglik(case: str, seed: int, variant: str, work: str):
    """(spec, family, per-sample log-likelihoods of the samples F is fitted on, exact) of one case,
    seed and posterior variant, from ``work`` when there."""
    from geomjobs.fisher.method import posterior_loglik
    from geomjobs.fisher.posterior import PosteriorConfig
    from geomjobs.fisher.sampling import load_samples, sample_grid
    from geomjobs.fisher.spec import grid_thetas, validate_fisher_spec

    raw = json.loads(json.dumps(CASES[case]["spec"]))
    raw["seed"] = seed
    raw["posterior"].update(CASES[case]["posteriors"][variant], seed=seed)
    spec, fam = validate_fisher_spec(raw)
    out = os.path.join(work, f"{case}-seed{seed}")
    sample_grid(spec, fam, out, progress=False)
    data = load_samples(out)
    key = hashlib.sha1(json.dumps(spec["posterior"], sort_keys=True).encode()).hexdigest()[:10]
    path = os.path.join(work, f"{case}-seed{seed}-{key}.npz")
    if not os.path.exists(path):
        ll, _ = posterior_loglik(PosteriorConfig(**spec["posterior"]), fam, data["x"], grid_thetas(spec), spec["potential"]["coords"])
        np.savez(path, loglik=ll)
    return spec, fam, np.load(path)["loglik"], data["exact"]


def errors(spec, fam, ll, exact, fit: str) -> dict:
    from geomjobs.fisher.posterior import PosteriorConfig, bundle_posteriors
    from geomjobs.fisher.potential import PotentialConfig, error_table, fit_potential
    from geomjobs.fisher.spec import grid_thetas, interior_mask

    post = PosteriorConfig(**spec["posterior"])
    lp, pts = bundle_posteriors(ll, post.fit_bundle, post.bundles_per_point, seed=post.seed)
    cfg = PotentialConfig(**{**spec["potential"], "fit": fit, "seed": post.seed})
    th = grid_thetas(spec)
    pot, _ = fit_potential(th, lp, pts, cfg)
    return error_table(th, pot.F(th), pot.grad(th), pot.hessian(th), exact, fam.sites, interior_mask(spec), cfg.coords)


def constant_score(spec, exact) -> float:
    """The best constant metric's relative Frobenius error over the interior (the interior mean)."""
    from geomjobs.fisher.spec import interior_mask

    ge = exact["g"][interior_mask(spec)]
    return float(np.sqrt(np.sum((ge - ge.mean(0)) ** 2) / np.sum(ge ** 2)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="ising4,ising8,tasep8")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fits", default=",".join(FITS))
    ap.add_argument("--work", default="out/fisher-metric-error")
    a = ap.parse_args(argv)
    seeds = [int(s) for s in a.seeds.split(",")]
    print("case | posterior | fit | metric rel. error per seed | mean +- sd | median per-point error per seed | "
          "constant metric | zero metric", flush=True)
    for case in a.cases.split(","):
        for variant in CASES[case]["posteriors"]:
            t0 = time.time()
            runs = [loglik(case, s, variant, a.work) for s in seeds]
            for fit in a.fits.split(","):
                es = [errors(*r, fit) for r in runs]
                g = np.array([e["metric_rel_error"] for e in es])
                med = np.array([e["metric_median_rel_error"] for e in es])
                const = constant_score(runs[0][0], runs[0][3])
                print(f"{case} | {variant} | {fit} | {' / '.join(f'{v:.3f}' for v in g)} | {g.mean():.3f} +- {g.std(ddof=1):.3f} | "
                      f"{' / '.join(f'{v:.3f}' for v in med)} | {const:.2f} | 1.00", flush=True)
            print(f"  ({case} {variant}: {time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
