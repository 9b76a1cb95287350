"""``descriptors.local_scaling``: local scaling psi, and local rank nu as its flag ``local_rank``.

psi and nu read one spectrum of the Jacobian, estimated by the mode the section names
(geometry/modes/), so nu is an output of this descriptor rather than one of its own: asking for
it costs nothing, and ``local_rank: {}`` alone runs this descriptor with its defaults.
"""
from __future__ import annotations

import numpy as np

from geomjobs.descriptors.base import Descriptor, floats, lists
from geomjobs.geometry import modes
from geomjobs.geometry.spectrum import cheaper_side


def resolve(section, dims):
    cfg = dict(section)
    cfg.setdefault("seed", 0)
    cfg.setdefault("save_singular_values", False)
    return modes.resolve(cfg, dims)[1]


def arrays(cfg, dims):
    return modes.ESTIMATORS[cfg["mode"]].arrays(cfg, dims)


def bind(cfg, g, z):
    """``mode: projection`` forms W A from the side XLA counts as cheaper for this model (k VJPs,
    or d JVPs and a product with W), both sweeps counted vmapped over a batch of 16 latents (the
    default execution.batch_size; what does not depend on the latent is counted once per batch):
    a choice of how, fixed per job, never part of the spec."""
    if cfg["mode"] != "projection":
        return {}
    shape = z.shape
    return {"side": cheaper_side(lambda zf: g(zf.reshape(shape)).reshape(-1), z.reshape(-1), cfg["k"])}


def compute(g, z, arrays, cfg):
    shape = z.shape
    flat = lambda zf: g(zf.reshape(shape)).reshape(-1)  # noqa: E731 - the estimators see G: R^d -> R^n
    spectrum = modes.ESTIMATORS[cfg["mode"]].apply(flat, z.reshape(-1), arrays, cfg)
    out = {"local_scaling": spectrum.local_scaling, "local_rank": spectrum.local_rank}
    if spectrum.singular_values is not None:
        out["singular_values"] = spectrum.singular_values
    return out


def columns(res, bad, cfg):
    cols = {"local_scaling": floats(res, "local_scaling", bad)}
    if cfg["local_rank"]:
        cols["local_rank"] = floats(res, "local_rank", bad)
    if cfg["save_singular_values"]:
        cols["singular_values"] = lists(res, "singular_values", bad, np.float64)
    return cols


def chunks(cfg, platform):
    return modes.ESTIMATORS[cfg["mode"]].chunks(cfg, platform)


def display(cfg):
    how = f"mode {cfg['mode']}"
    if cfg.get("side") == "jvp":
        how += ", W A from d JVPs"
    if "chunk" in modes.ESTIMATORS[cfg["mode"]].keys:
        how += ", all rows in one pass" if cfg.get("chunk") is None else f", chunks of {cfg['chunk']}"
    return f"local_scaling ({how})" + (" + local_rank" if cfg["local_rank"] else "")


def marker(cfg):
    return {"mode": cfg["mode"], **({"side": cfg["side"]} if "side" in cfg else {})}


# nu is never null where psi is not: a non-finite nu fails the sample even when not asked for
DESCRIPTOR = Descriptor("local_scaling", frozenset({"local_scaling", "local_rank"}), resolve, compute, columns, arrays,
                        bind=bind, finite=("local_scaling", "local_rank"), chunks=chunks, display=display, marker=marker)
