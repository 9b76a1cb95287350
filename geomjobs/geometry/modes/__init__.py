"""The local-scaling estimators, found by name (``descriptors.local_scaling.mode``).

Every module of this package that defines ``ESTIMATOR`` (a :class:`base.Estimator`) is a mode:
adding one is a new file here plus its keys in the job schema. See :mod:`.base` for the
interface and :func:`resolve` for how a spec's section becomes a mode's configuration.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from geomjobs.errors import SpecError
from geomjobs.geometry.modes.base import COMMON_KEYS, KEY, Dims, Estimator, Spectrum


def _discover() -> dict[str, Estimator]:
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        est = getattr(importlib.import_module(f"{__name__}.{info.name}"), "ESTIMATOR", None)
        if est is not None:
            found[est.name] = est
    return found


ESTIMATORS: dict[str, Estimator] = _discover()
EXACT_MAX_ENTRIES = 1 << 22   # the default mode is exact while the dense Jacobian has <= 4M entries


def default_mode(dims: Dims) -> str:
    return "exact" if dims.n * dims.d <= EXACT_MAX_ENTRIES else "projection"


def resolve(cfg: Mapping, dims: Dims) -> tuple[Estimator, dict]:
    """(estimator, its configuration): ``cfg`` (a schema-valid ``local_scaling`` section with
    ``seed`` and ``save_singular_values`` filled) with the mode chosen for the sizes when absent,
    every default filled and every bound checked. ``cfg`` itself is not changed."""
    mode = cfg.get("mode") or default_mode(dims)
    if mode not in ESTIMATORS:
        raise SpecError(f"{KEY}.mode", f"expected one of {sorted(ESTIMATORS)}, got {mode!r}")
    est = ESTIMATORS[mode]
    for key in sorted(set(cfg) - COMMON_KEYS - est.keys):
        owners = [name for name, other in ESTIMATORS.items() if key in other.keys]
        raise SpecError(f"{KEY}.{key}", f"only applies to mode: {' or '.join(owners)}")
    if cfg.get("save_singular_values") and not est.has_singular_values:
        raise SpecError(f"{KEY}.save_singular_values", f"mode {mode} gives psi without individual singular "
                                                       "values; use mode lanczos or exact to save them")
    return est, est.resolve({**cfg, "mode": mode}, dims)


__all__ = ["ESTIMATORS", "Dims", "Estimator", "Spectrum", "default_mode", "resolve"]
