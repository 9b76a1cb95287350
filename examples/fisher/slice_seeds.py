"""Does a slice's tr g map reproduce between sampling seeds? For two fisher output folders of the
same slice spec at different ``seed`` (their samples/ finished), F's grid values are solved once
per seed (the spec's posterior and window), then read with potential.smooth = 0, 1, 2, 3, 4, 6
grid cells; printed: Spearman's rho of the two seeds' interior tr g maps, and the share of the
interior with tr g <= 0, per smoothing. This is how the 128 x 128 examples' smooth: 4 was chosen
(docs/fisher.md).

    PYTHONPATH=. python examples/fisher/slice_seeds.py SPEC.yaml OUT_SEED_A OUT_SEED_B
"""
from __future__ import annotations

import dataclasses
import sys

import numpy as np
import yaml

from geomjobs.fisher.posterior import PosteriorConfig, bundle_posteriors, feature_loglik, window_cells
from geomjobs.fisher.potential import PotentialConfig
from geomjobs.fisher.sampling import load_samples
from geomjobs.fisher.shapefit import fit_shape, grid_values
from geomjobs.fisher.slice_stats import spearman
from geomjobs.fisher.spec import grid_thetas, interior_mask, validate_fisher_spec

SMOOTH = (0, 1, 2, 3, 4, 6)


def traces(spec: dict, family, out: str) -> dict:
    post, pcfg = PosteriorConfig(**spec["posterior"]), PotentialConfig(**spec["potential"])
    th = grid_thetas(spec)
    cells = window_cells(tuple(spec["grid"]["resolution"]), post.window) if post.window else None
    ll = feature_loglik(family.features, load_samples(out)["x"], cells)
    lp, pts = bundle_posteriors(ll, post.fit_bundle, post.bundles_per_point, seed=post.seed)
    c = None if cells is None else cells[pts]
    vals = grid_values(th, lp, pts, c)
    inner = interior_mask(spec)
    res = {}
    for s in SMOOTH:
        pot, _ = fit_shape(th, lp, pts, dataclasses.replace(pcfg, smooth=float(s)), cells=c, values=vals)
        res[s] = np.trace(pot.hessian(th), axis1=1, axis2=2)[inner]
    return res


def main(spec_path: str, out_a: str, out_b: str) -> dict:
    spec, family = validate_fisher_spec(yaml.safe_load(open(spec_path)))
    ta, tb = traces(spec, family, out_a), traces(spec, family, out_b)
    res = {}
    for s in SMOOTH:
        res[s] = (spearman(ta[s], tb[s]), float((ta[s] <= 0).mean()))
        print(f"smooth {s}: Spearman of tr g between seeds {res[s][0]:.3f}; tr g <= 0 on {100 * res[s][1]:.1f} % of the interior",
              flush=True)
    return res


if __name__ == "__main__":
    main(*sys.argv[1:])
