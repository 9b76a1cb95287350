"""The one interface of the descriptors (the sections of ``spec['descriptors']``).

A descriptor is pure functions fixed per kind, as an estimator is (geometry/modes/base.py):

- ``resolve(section, dims) -> dict``: its spec section with every default filled and every bound
  checked (a new mapping). The resolved spec stores it, so it decides the spec hash.
- ``arrays(cfg, dims) -> {name: ndarray}``: the arrays fixed per job, drawn with NumPy from the
  spec's seeds; they enter the jitted step as arguments, never as constants.
- ``bind(cfg, g, z) -> dict``: what a job fixes by tracing its model once, before any sample
  (the counted nonlinearity sites); it joins ``cfg``, never the spec.
- ``compute(g, z, arrays, cfg) -> {output: value}``: the outputs at ONE latent ``z`` (in the
  model's shape), where ``g(z)`` is the model at the job's parameters and the record's timestep.
- ``columns(res, bad, cfg) -> {record column: values}``: the record columns from the outputs of
  a shard (``res``: per-sample arrays; ``bad``: the samples that failed, masked to null).
- ``finite``: the outputs a sample must have finite; a sample whose value is not fails.
- ``chunks(cfg, platform)``: the chunk sizes the engine may compile, best first, or None where
  the descriptor takes no chunk (runner/engine.py fits the chunk to XLA's memory plan).
- ``display(cfg)`` and ``marker(cfg)``: how a shard's commit marker describes it.

``cfg`` is the resolved section, plus ``flag: bool`` for each flag (``keys`` other than
``name``: empty sections that switch on an output the descriptor computes anyway, as
``local_rank`` is read from psi's spectrum), plus what ``bind`` fixed, plus, while the engine
compiles, ``chunk``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from geomjobs.geometry.modes.base import Dims

KEY = "descriptors"


def no_arrays(cfg: Mapping, dims: Dims) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class Descriptor:
    name: str                                          # its section of spec['descriptors']
    keys: frozenset                                    # the sections it answers: name and its flags
    resolve: Callable[[Mapping, Dims], dict]
    compute: Callable[[Callable, object, Mapping, Mapping], dict]
    columns: Callable[[Mapping, np.ndarray, Mapping], dict]
    arrays: Callable[[Mapping, Dims], dict] = no_arrays
    bind: Callable[[Mapping, Callable, object], dict] | None = None
    finite: tuple[str, ...] = ()
    chunks: Callable[[Mapping, str], list] | None = None
    display: Callable[[Mapping], str] | None = None    # None: the name
    marker: Callable[[Mapping], dict] | None = None    # None: no keys of its own

    @property
    def flags(self) -> frozenset:
        return self.keys - {self.name}


class Bound(NamedTuple):
    """A descriptor as one job runs it: the descriptor and its ``cfg`` (see the module doc)."""
    descriptor: Descriptor
    cfg: Mapping


def floats(res: Mapping, key: str, bad: np.ndarray, dtype=np.float64):
    """A scalar column, null where the sample failed."""
    return np.ma.masked_array(np.asarray(res[key], dtype), mask=bad)


def lists(res: Mapping, key: str, bad: np.ndarray, dtype):
    """A list column (one fixed-width row per sample), null where the sample failed; built from
    offsets, with no per-record Python loop."""
    n = len(bad)
    values = np.asarray(res[key], dtype).reshape(n, -1)
    width = values.shape[1]
    arr = pa.ListArray.from_arrays(pa.array(np.arange(0, n * width + 1, width, dtype=np.int32)),
                                   pa.array(values.reshape(-1)))
    return arr if not bad.any() else pa.ListArray.from_arrays(arr.offsets, arr.values, mask=pa.array(bad))
