"""What a fisher run writes besides its samples: ``metric.parquet``, ``fisher.json``, the fitted
networks (``potential.msgpack``, ``posterior.msgpack``, ``networks.json``; flax serialisation),
and how to read F back (:func:`load_potential`)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from geomjobs.sink.fs import filesystem, join, normalize_uri

METRIC_COLUMNS = ("theta_1", "theta_2", "F", "dF_1", "dF_2", "g_11", "g_12", "g_22",
                  "exact_F", "exact_g_11", "exact_g_12", "exact_g_22")


def _write(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    with fs.open(path, "wb") as f:
        f.write(data)


def write_metric(out: str, thetas, F, dF, g, exact) -> None:
    """``metric.parquet``: one row per grid point (theta_1 index major), the fitted F, dF, g and
    the exact references (null where none)."""
    import pandas as pd

    nul = np.full(len(thetas), np.nan)
    ex = exact or {}
    df = pd.DataFrame({
        "theta_1": thetas[:, 0], "theta_2": thetas[:, 1], "F": F, "dF_1": dF[:, 0], "dF_2": dF[:, 1],
        "g_11": g[:, 0, 0], "g_12": g[:, 0, 1], "g_22": g[:, 1, 1],
        "exact_F": ex.get("F", nul),
        "exact_g_11": ex["g"][:, 0, 0] if ex else nul, "exact_g_12": ex["g"][:, 0, 1] if ex else nul,
        "exact_g_22": ex["g"][:, 1, 1] if ex else nul,
    }, columns=list(METRIC_COLUMNS))
    fs, path = filesystem(join(out, "metric.parquet"))
    with fs.open(path, "wb") as f:
        df.to_parquet(f, index=False)


def write_summary(out: str, summary: dict, geo: list[dict]) -> None:
    """``fisher.json``: the summary and the geodesics' paths."""
    paths = [{"path": np.asarray(gd["path"]).tolist(),
              "exact_path": None if gd.get("exact_path") is None else np.asarray(gd["exact_path"]).tolist()} for gd in geo]
    _write(join(out, "fisher.json"), json.dumps({**summary, "geodesic_paths": paths}, indent=1, default=_json_default).encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def write_networks(out: str, fit: dict) -> None:
    """The fitted F (and the posterior network, when one was trained) and ``networks.json``, what
    it takes to rebuild them."""
    from flax import serialization

    pot = fit["potential"]
    c = pot.cfg
    if c.fit in ("shape", "curvature"):
        cfg = {"potential": {"fit": c.fit, "degree": list(pot.degree), "coords": c.coords,
                             "note": "F(t) = the piecewise polynomial F (per cell [bx_i, bx_i+1] x [by_j, by_j+1]: "
                                     "sum_ab C[i, j, a, b] (u_1 - mid_i)^a (u_2 - mid_j)^b) + <lin, u>, per sample "
                                     "(geomjobs.fisher.shapefit.spline_f); u = the fitting coordinates (identity: u = t; "
                                     "log: u = log t); with fit curvature the metric's components are the piecewise "
                                     "polynomials g11, g12, g22 in theta"}}
    else:
        cfg = {"potential": {"fit": c.fit, "width": c.width, "depth": c.depth, "centre": np.asarray(pot.centre).tolist(),
                             "half_width": np.asarray(pot.half_width).tolist(), "coords": c.coords, "convex": c.convex,
                             "note": "F(t) = FNet(width, depth, convex).apply(params, (u(t) - centre) / half_width), per sample; "
                                     "u = the fitting coordinates (identity: u = t; log: u = log t)"}}
    files = {"potential.msgpack": serialization.to_bytes(pot.params)}
    if fit["posterior_params"] is not None:
        net = fit["posterior_net"]
        pp = fit["posterior_params"]
        # cross-fitted folds: {"fold_0": params, ...}, one network per fold
        files["posterior.msgpack"] = serialization.to_bytes({f"fold_{k}": p for k, p in enumerate(pp)} if isinstance(pp, list) else pp)
        cfg["posterior"] = {"n_points": net.n_points, "lattice": net.lattice, "hidden": net.hidden,
                            "grid": None if net.grid is None else [list(r) for r in net.grid], "rank": net.rank,
                            "folds": len(pp) if isinstance(pp, list) else 1,
                            "note": "per-sample grid logits; a bundle's log-posterior is the sum over its samples"}
    files["networks.json"] = json.dumps(cfg, indent=1).encode()
    for name, blob in files.items():
        _write(join(out, name), blob)


def load_potential(out: str):
    """The fitted F of a finished fisher output folder (a :class:`~geomjobs.fisher.potential.Potential`,
    or a :class:`~geomjobs.fisher.shapefit.SplinePotential` for ``fit: shape``)."""
    import jax
    import jax.numpy as jnp
    from flax import serialization

    from geomjobs.fisher.potential import Potential, PotentialConfig

    fs, path = filesystem(join(normalize_uri(out), "networks.json"))
    saved = json.loads(fs.cat_file(path))["potential"]
    fields = {f.name for f in dataclasses.fields(PotentialConfig)}
    cfg = PotentialConfig(**{k: v for k, v in saved.items() if k in fields})
    if cfg.fit in ("shape", "curvature"):
        from geomjobs.fisher.shapefit import SplinePotential

        fs, path = filesystem(join(normalize_uri(out), "potential.msgpack"))
        raw = serialization.msgpack_restore(fs.cat_file(path))
        return SplinePotential(jax.tree_util.tree_map(lambda v: jnp.asarray(v, jnp.float32), raw), tuple(saved["degree"]), cfg)
    template = cfg.net().init(jax.random.PRNGKey(0), jnp.zeros((1, 2)))
    fs, path = filesystem(join(normalize_uri(out), "potential.msgpack"))
    params = serialization.from_bytes(template, fs.cat_file(path))
    return Potential(params, np.asarray(saved["centre"], np.float32), np.asarray(saved["half_width"], np.float32), cfg)
