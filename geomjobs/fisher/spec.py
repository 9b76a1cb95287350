"""A fisher spec (docs/fisher.md): the JSON schema ``geomjobs/schemas/fisher.schema.json``, the
defaults of each section (the field defaults of its config: :class:`PosteriorConfig`,
:class:`PotentialConfig`, :class:`GeodesicConfig`; the family's own, :meth:`Family.resolved`)
and every check that needs no sample, each a SpecError naming the key, before any work: the
family's keys, the grid (>= 3 points per axis, inside the family's domain), the posterior kind
(``oracle`` only where the exact likelihood is computable) and the bundle sizes. Also the theta
grid the spec describes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from importlib import resources

import jsonschema
import numpy as np

from geomjobs.errors import SpecError
from geomjobs.fisher.geodesic import GeodesicConfig
from geomjobs.fisher.posterior import KINDS, PosteriorConfig
from geomjobs.fisher.potential import PotentialConfig
from geomjobs.spec import explain_schema_error, load_yaml

EXECUTION_DEFAULTS = {"shard_size": 16, "max_retries": 3}


def fisher_schema() -> dict:
    return json.loads(resources.files("geomjobs.schemas").joinpath("fisher.schema.json").read_text())


def grid_axes(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    g = spec["grid"]
    return tuple(np.linspace(g["low"][i], g["high"][i], g["resolution"][i]) for i in range(2))


def grid_thetas(spec: dict) -> np.ndarray:
    """(P, 2) grid points, theta_1 index major: point p = i1 * R2 + i2."""
    a1, a2 = grid_axes(spec)
    return np.stack(np.meshgrid(a1, a2, indexing="ij"), -1).reshape(-1, 2)


def interior_mask(spec: dict) -> np.ndarray:
    """Grid points not on the box's edge. At an edge the posteriors and q_F are cut off by the
    grid on one side, so F's curvature there is pinned by one side only and the net extrapolates."""
    R1, R2 = spec["grid"]["resolution"]
    m = np.zeros((R1, R2), bool)
    m[1:-1, 1:-1] = True
    return m.ravel()


def default_pairs(spec: dict) -> list:
    """The geodesics' end points when the spec gives none: the box's two diagonals, 10 % inside."""
    lo, hi = np.asarray(spec["grid"]["low"], float), np.asarray(spec["grid"]["high"], float)
    a = lo + 0.1 * (hi - lo)
    b = hi - 0.1 * (hi - lo)
    return [[a.tolist(), b.tolist()], [[a[0], b[1]], [b[0], a[1]]]]


def validate_fisher_spec(raw) -> tuple[dict, object]:
    """(spec with every default filled, family). SpecError naming the key on any bad input."""
    from geomjobs.fisher.families import build_family
    if not isinstance(raw, dict):
        raise SpecError("", f"a fisher spec must be a mapping, got {type(raw).__name__}")
    errors = list(jsonschema.Draft202012Validator(fisher_schema()).iter_errors(raw))
    if errors:
        raise explain_schema_error(jsonschema.exceptions.best_match(errors))
    spec = copy.deepcopy(raw)
    family = build_family(spec["family"])
    spec["family"] = family.resolved()
    spec.setdefault("seed", 0)
    post = PosteriorConfig(**{"kind": family.posterior_kinds[0], **spec.get("posterior", {})})
    spec["posterior"] = dataclasses.asdict(post)
    spec["potential"] = dataclasses.asdict(PotentialConfig(**spec.get("potential", {})))
    spec["geodesics"] = dataclasses.asdict(GeodesicConfig(**spec.get("geodesics", {})))
    spec["execution"] = {**EXECUTION_DEFAULTS, **spec.get("execution", {})}
    spec.setdefault("figures", True)
    _check_grid(spec, family)
    _check_posterior(spec, family, post)
    for k, (a, b) in enumerate(spec["geodesics"]["pairs"] or []):
        grid = spec["grid"]
        for end in (a, b):
            if not all(grid["low"][i] <= end[i] <= grid["high"][i] for i in range(2)):
                raise SpecError(f"geodesics.pairs.{k}", f"end point {end} is outside the grid box {grid['low']}..{grid['high']}")
    return spec, family


def _check_grid(spec: dict, family) -> None:
    """The box (the family's default where the spec gives none), >= 3 points per axis, low < high,
    every point in the family's domain and, for log fitting coordinates, > 0."""
    grid = spec["grid"]
    if "low" not in grid or "high" not in grid:
        if family.default_box is None:
            raise SpecError("grid.low" if "low" not in grid else "grid.high", "is required for this family (the theta box)")
        grid.setdefault("low", [float(v) for v in family.default_box[0]])
        grid.setdefault("high", [float(v) for v in family.default_box[1]])
    for i in range(2):
        if grid["resolution"][i] < 3:
            raise SpecError(f"grid.resolution.{i}", f"expected at least 3 points per axis (the Hessian of F needs interior "
                                                    f"points), got {grid['resolution'][i]}")
        if not grid["low"][i] < grid["high"][i]:
            raise SpecError("grid.high", f"expected high > low on axis {i + 1}, got low={grid['low']} high={grid['high']}")
    family.check_thetas(grid_thetas(spec), key="grid")
    if spec["potential"]["coords"] == "log" and not (grid_thetas(spec) > 0).all():
        raise SpecError("potential.coords", f"'log' fitting coordinates need every grid theta > 0, got low = {grid['low']}")


def _check_posterior(spec: dict, family, post: PosteriorConfig) -> None:
    """The posterior kind fits the family, and samples_per_point fills its bundles."""
    n, default = spec["samples_per_point"], family.posterior_kinds[0]
    if post.kind == "oracle" and not family.has_oracle:
        raise SpecError("posterior.kind", f"'oracle' is not computable here: {family.no_oracle_reason}; use kind: {default}")
    if post.kind not in family.posterior_kinds:
        raise SpecError("posterior.kind", f"'{post.kind}' ({KINDS[post.kind]}) is not for family kind '{family.kind}'; "
                                          f"it takes {list(family.posterior_kinds)} ({default}: {KINDS[default]})")
    if 0 < post.window < 3:
        raise SpecError("posterior.window", f"expected 0 (the whole grid) or a window of >= 3 cells per axis (the metric "
                                            f"is a second derivative), got {post.window}")
    if post.kind == "features" and n < 2:
        raise SpecError("samples_per_point", f"the feature posterior needs at least 2 samples per point (the first half are "
                                             f"the point's references, the rest bundle samples), got {n}")
    if n < post.bundle:
        raise SpecError("samples_per_point", f"expected at least posterior.bundle = {post.bundle} samples per point "
                                             f"(one bundle), got {n}")
    if post.kind == "learned" and post.folds > n:
        raise SpecError("posterior.folds", f"{post.folds} folds need at least as many samples per point, got {n}")
    if post.kind == "learned":
        n_train = post.split(n)
        if n_train < post.bundle or n - n_train < 1:
            raise SpecError("samples_per_point", f"{n} samples per point leave {n_train} for training bundles of "
                                                 f"{post.bundle} and {n - n_train} held out (posterior.holdout = {post.holdout}, "
                                                 f"folds = {post.folds}); "
                                                 "more samples are needed")


def load_fisher_spec(path) -> tuple[dict, object]:
    """Read a YAML fisher spec and validate it (:func:`validate_fisher_spec`)."""
    return validate_fisher_spec(load_yaml(path))
