"""What every notebook under ``notebooks/`` shares: its size (small defaults or full) and its
output folder, chosen by the environment so that a notebook runs unchanged as a plain script,
under nbclient, or from :mod:`geomjobs.analysis.run_notebooks`:

    GEOMJOBS_NB_FULL=1          full size (``make notebooks``); unset or 0: the small defaults
    GEOMJOBS_NB_OUT=folder      where the notebook writes its datasets and PNGs
                                (default: out/notebooks/<notebook name>)

A notebook's ``parameters`` cell sets ``full = None`` and ``out_dir = None``; papermill-style
injected values win over the environment.
"""
from __future__ import annotations

import os

__all__ = ["FULL_ENV", "OUT_ENV", "notebook_env"]

FULL_ENV = "GEOMJOBS_NB_FULL"
OUT_ENV = "GEOMJOBS_NB_OUT"


def notebook_env(name: str, full=None, out_dir=None) -> tuple[bool, str]:
    """(full, out_dir) for notebook ``name``: explicit arguments first, then the environment
    (:data:`FULL_ENV`, :data:`OUT_ENV`), then small size and ``out/notebooks/<name>``. The
    folder is created."""
    if full is None:
        raw = os.environ.get(FULL_ENV, "0").strip().lower()
        if raw not in ("", "0", "1", "true", "false", "yes", "no"):
            raise ValueError(f"{FULL_ENV} must be 0 or 1, got {raw!r}")
        full = raw in ("1", "true", "yes")
    if out_dir is None:
        out_dir = os.environ.get(OUT_ENV) or os.path.join("out", "notebooks", name)
    out_dir = os.path.abspath(os.path.expanduser(str(out_dir)))
    os.makedirs(out_dir, exist_ok=True)
    return bool(full), out_dir
