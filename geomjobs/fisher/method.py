"""The method on a grid's samples (Lobashev et al., section 3): per-sample log-likelihoods from the
posterior (learned network, the family's exact likelihood, or classifier features), tempered
bundle posteriors, the fit of F, and geodesics of the fitted metric beside those of the exact one.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from geomjobs.fisher.geodesic import GeodesicConfig
from geomjobs.fisher.posterior import PosteriorConfig
from geomjobs.fisher.potential import PotentialConfig
from geomjobs.fisher.spec import default_pairs, grid_axes


def posterior_loglik(cfg: PosteriorConfig, family, x: np.ndarray, thetas: np.ndarray, coords: str,
                     cells: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Per-sample log-likelihoods over the grid (P, m, P) of the samples F is fitted on (with
    ``cells`` (P, K), :func:`~geomjobs.fisher.posterior.window_cells`: over each point's window
    only, (P, m, K); the features posterior computes just those), and
    {"posterior_net", "posterior_params" (None but for a learned posterior; a list of the folds'
    with ``folds`` >= 2), losses}."""
    from geomjobs.fisher import posterior as post_mod

    info: dict = {"posterior_net": None, "posterior_params": None}
    if cfg.kind == "features":
        return post_mod.feature_loglik(family.features, x, cells), info
    ll, info = _full_loglik(cfg, family, x, thetas, coords, info)
    return (ll if cells is None else np.take_along_axis(ll, cells[:, None, :], 2)), info


def _full_loglik(cfg: PosteriorConfig, family, x, thetas, coords: str, info: dict) -> tuple[np.ndarray, dict]:
    from geomjobs.fisher import posterior as post_mod
    from geomjobs.fisher.potential import to_coords

    if cfg.kind == "oracle":
        return post_mod.oracle_loglik(family, x, thetas), info
    grid = to_coords(coords, thetas)
    if cfg.folds > 1:
        # cross-fitting: fold k's log-likelihoods from the network trained without it
        fold = cfg.fold_of(x.shape[1])
        out, nets = None, []
        for k in range(cfg.folds):
            net, params, tinfo = post_mod.train_posterior(x[:, fold != k], dataclasses.replace(cfg, seed=cfg.seed + k), grid=grid)
            ll = post_mod.learned_loglik(net, params, x[:, fold == k])
            out = np.zeros(x.shape[:2] + ll.shape[2:]) if out is None else out
            out[:, fold == k] = ll
            nets.append((params, tinfo))
        info.update(posterior_net=net, posterior_params=[p for p, _ in nets],
                    posterior_loss=float(np.mean([t["loss"] for _, t in nets])),
                    posterior_loss_history=[t["loss_history"] for _, t in nets])
        return out, info
    n_train = cfg.split(x.shape[1])
    net, params, tinfo = post_mod.train_posterior(x[:, :n_train], cfg, grid=grid)
    info.update(posterior_net=net, posterior_params=params, posterior_loss=tinfo["loss"],
                posterior_loss_history=tinfo["loss_history"])
    return post_mod.learned_loglik(net, params, x[:, n_train:]), info


def fit_method(spec: dict, family, x: np.ndarray, thetas: np.ndarray) -> dict:
    """Posterior -> tempered bundle posteriors -> F. Returns {"potential", "posterior_net",
    "posterior_params", "info": the losses, sizes and times for the summary}."""
    from geomjobs.fisher.posterior import bundle_posteriors, window_cells
    from geomjobs.fisher.potential import fit_potential

    post, pcfg = PosteriorConfig(**spec["posterior"]), PotentialConfig(**spec["potential"])
    t0 = time.time()
    cells = window_cells(tuple(spec["grid"]["resolution"]), post.window) if post.window else None
    loglik, nets = posterior_loglik(post, family, x, thetas, pcfg.coords, cells)
    info = {k: v for k, v in nets.items() if k.startswith("posterior_loss")}
    info["posterior_seconds"] = time.time() - t0
    lp, pts = bundle_posteriors(loglik, post.fit_bundle, post.bundles_per_point, seed=post.seed)
    info["fit_bundle"] = min(post.fit_bundle, loglik.shape[1])
    t0 = time.time()
    if cells is not None:
        info["window_cells"] = int(cells.shape[1])
    pot, pinfo = fit_potential(thetas, lp, pts, pcfg, cells=None if cells is None else cells[pts])
    info["potential_loss"] = pinfo["loss"]
    info["potential_loss_history"] = pinfo["loss_history"]
    info["potential_seconds"] = time.time() - t0
    return {"potential": pot, "posterior_net": nets["posterior_net"], "posterior_params": nets["posterior_params"],
            "info": info}


def geodesics(spec: dict, pot, exact) -> list[dict]:
    """Each pair's geodesic under the fitted metric, its metric length and the straight line's;
    with the exact metric (bilinear between grid points) beside it where one exists."""
    from geomjobs.fisher.geodesic import geodesics as solve
    from geomjobs.fisher.geodesic import grid_metric, path_length, psd

    cfg = GeodesicConfig(**spec["geodesics"])
    pairs = cfg.pairs or default_pairs(spec)
    # interior points stay one grid cell inside the box: on the edge row F's curvature is pinned
    # from one side only (see interior_mask) and a noisy, flat edge would be a shortcut
    lo, hi = np.asarray(spec["grid"]["low"], float), np.asarray(spec["grid"]["high"], float)
    cell = (hi - lo) / (np.asarray(spec["grid"]["resolution"]) - 1)
    box = (lo + cell, hi - cell)
    n = cfg.points
    met = pot.metric_fn()
    R1, R2 = spec["grid"]["resolution"]
    est = solve(met, pairs, n_points=n, bounds=box)
    ex = None
    if exact is not None:
        ex_met = grid_metric(grid_axes(spec), exact["g"].reshape(R1, R2, 2, 2))
        ex = solve(ex_met, pairs, n_points=n, bounds=box)
    res = []
    for k, (a, b) in enumerate(pairs):
        path, length = est[k]
        line = np.linspace(0, 1, n)[:, None] * (np.asarray(b) - np.asarray(a)) + np.asarray(a)
        d = {"a": list(a), "b": list(b), "path": path, "length": length,
             "straight_length": path_length(lambda t: psd(met(t)), line)}
        if ex is not None:
            ep, el = ex[k]
            d.update({"exact_path": ep, "exact_length": el, "exact_straight_length": path_length(ex_met, line),
                      "estimated_path_exact_length": path_length(ex_met, path)})
        res.append(d)
    return res
