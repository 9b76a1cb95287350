"""Weights of the models the project ships: ``<stem>.npz`` + ``<stem>.json``, one format for all.

The .npz holds the flattened Flax param pytree ('/'-joined keys, float32); the .json holds the
architecture and whatever the model needs besides (schedule, objective, data, training record).
Every loader error names the file and what was expected; ``what`` ("DDPM", "VAE") and
``script`` (the module that writes such files) only shape those messages.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def zoo_path(stem: str) -> Path:
    """Path (without suffix) of a file shipped in ``geomjobs/zoo/``."""
    return Path(str(resources.files("geomjobs.zoo").joinpath(stem)))


def resolve_pair(path_or_name, zoo_files: dict[str, str], *, what: str, script: str) -> tuple[Path, Path]:
    """(npz, json) for a zoo name, a stem path, or a path to either file."""
    s = str(path_or_name)
    if s in zoo_files:
        stem = zoo_path(zoo_files[s])
    else:
        p = Path(s)
        if p.suffix in (".npz", ".json"):
            stem = p.with_suffix("")
        elif p.exists() or p.with_suffix(".npz").exists() or p.with_suffix(".json").exists() or "/" in s or "\\" in s:
            stem = p
        else:
            raise ValueError(f"unknown {what} zoo model {s!r}; known models: {sorted(zoo_files)} "
                             f"(or pass a path to a .npz/.json pair written by {script})")
    return stem.with_suffix(".npz"), stem.with_suffix(".json")


def read_meta(json_path: Path, required: dict[str, tuple[str, ...]], *, what: str, script: str) -> dict:
    """The .json of a pair, checked to hold each ``section`` with its ``keys``."""
    if not json_path.is_file():
        raise ValueError(f"{what} metadata file '{json_path}' does not exist "
                         f"(expected a .json written by {script} next to the .npz)")
    try:
        meta = json.loads(json_path.read_text())
    except Exception as e:
        raise ValueError(f"{what} metadata file '{json_path}' is not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what} metadata file '{json_path}' must hold a JSON object, got {type(meta).__name__}")
    for section, keys in required.items():
        if not isinstance(meta.get(section), dict):
            raise ValueError(f"{what} metadata file '{json_path}' has no '{section}' object")
        missing = [k for k in keys if k not in meta[section]]
        if missing:
            raise ValueError(f"{what} metadata file '{json_path}': '{section}' lacks {missing}")
    return meta


def read_params(npz_path: Path, expected: Any, *, what: str, script: str) -> Any:
    """The param pytree from the .npz, checked key by key against ``expected`` (abstract shapes,
    e.g. ``jax.eval_shape(module.init, ...)``): same keys, same shapes, finite floats."""
    if not npz_path.is_file():
        raise ValueError(f"{what} weight file '{npz_path}' does not exist "
                         f"(expected a .npz of the flattened Flax params, written by {script})")
    try:
        with np.load(npz_path, allow_pickle=False) as f:
            flat = {k: f[k] for k in f.files}
    except Exception as e:  # zip errors, truncated files, pickles
        raise ValueError(f"{what} weight file '{npz_path}' is not a readable .npz ({type(e).__name__}: {e})") from None
    want = traverse_util.flatten_dict(expected, sep="/")
    if set(flat) != set(want):
        raise ValueError(f"{what} weight file '{npz_path}' does not match the architecture in its .json: "
                         f"missing {sorted(set(want) - set(flat))}, unexpected {sorted(set(flat) - set(want))}")
    for k, spec in want.items():
        a = flat[k]
        if a.shape != spec.shape:
            raise ValueError(f"{what} weight file '{npz_path}': '{k}' has shape {a.shape}, expected {spec.shape}")
        if not np.issubdtype(a.dtype, np.floating) or not np.all(np.isfinite(a)):
            raise ValueError(f"{what} weight file '{npz_path}': '{k}' must be finite floats (dtype {a.dtype})")
    return traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")


def save_pair(stem, params, meta: dict) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` (flattened float32 params, '/'-joined keys) and ``<stem>.json``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = traverse_util.flatten_dict(jax.device_get(params), sep="/")
    npz_path, json_path = stem.with_suffix(".npz"), stem.with_suffix(".json")
    with open(npz_path, "wb") as f:
        np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    json_path.write_text(json.dumps(meta, indent=2) + "\n")
    return npz_path, json_path
