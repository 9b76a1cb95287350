"""``descriptors.local_complexity``: delta, the neurons whose input changes sign over the 2P
vertices z +- r b_i of a cross-polytope (Humayun et al., 2025), counted by interpreting the
model's jaxpr (geometry/complexity.py) at the nonlinearity sites the job selects."""
from __future__ import annotations

import numpy as np

from geomjobs.descriptors.base import KEY, Descriptor, floats, lists
from geomjobs.errors import SpecError
from geomjobs.geometry.complexity import local_complexity, select_sites, trace_sites
from geomjobs.geometry.projections import orthonormal_rows

NAME = "local_complexity"
DEFAULT_DIRECTIONS = 4        # the paper's P


def resolve(section, dims):
    lc = dict(section)
    lc.setdefault("radius", 1e-4)
    lc.setdefault("seed", 0)
    lc.setdefault("per_layer", False)
    if "layers" in lc and "last" in lc:
        raise SpecError(f"{KEY}.{NAME}.last", "give either 'layers' or 'last', not both")
    out = {"directions": min(DEFAULT_DIRECTIONS, dims.d), **lc}
    if out["directions"] > dims.d:
        raise SpecError(f"{KEY}.{NAME}.directions",
                        f"expected at most d = {dims.d} directions (rows of B are orthonormal in R^d), got {out['directions']}")
    return out


def arrays(cfg, dims):
    return {"B": orthonormal_rows(cfg["directions"], dims.d, cfg["seed"], stream="B")}


def bind(cfg, g, z):
    """The counted sites, chosen once from the model's trace (a misspelt layer fails the plan)."""
    all_sites = trace_sites(g, z)
    try:
        idx = select_sites(all_sites, names=cfg.get("layers"), last=cfg.get("last"))
    except ValueError as e:
        raise SpecError(f"{KEY}.{NAME}." + ("layers" if "layers" in cfg else "last"), str(e)) from None
    return {"sites": list(idx), "site_labels": [all_sites[i].label for i in idx]}


def compute(g, z, arrays, cfg):
    total, per = local_complexity(g, z, arrays["B"], cfg["radius"], sites=cfg["sites"])
    return {"local_complexity": total, "local_complexity_per_layer": per}


def columns(res, bad, cfg):
    cols = {"local_complexity": floats(res, "local_complexity", bad, np.int64)}
    if cfg["per_layer"]:
        cols["local_complexity_per_layer"] = lists(res, "local_complexity_per_layer", bad, np.int64)
    return cols


def display(cfg):
    return f"local_complexity ({cfg['directions']} directions, {len(cfg['sites'])} site(s))"


# counts are integers: always finite
DESCRIPTOR = Descriptor(NAME, frozenset({NAME}), resolve, compute, columns, arrays, bind=bind, display=display)
