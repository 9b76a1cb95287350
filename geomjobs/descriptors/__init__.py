"""The descriptors a job computes, found by name (the sections of ``spec['descriptors']``).

Every module of this package that defines ``DESCRIPTOR`` (a :class:`base.Descriptor`) is one:
adding one is a new file here plus its section in the job schema and its columns in the record
schema; the runner loops over a plan's descriptors and knows none by name. See :mod:`.base` for
the interface and :func:`resolve` for how a spec's sections become a job's descriptors.

This package sits above ``geometry``, ``generators`` and ``latents`` and below ``runner``.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping

from geomjobs.descriptors.base import KEY, Bound, Descriptor, Dims
from geomjobs.errors import SpecError


def _discover() -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        desc = getattr(importlib.import_module(f"{__name__}.{info.name}"), "DESCRIPTOR", None)
        if desc is None:
            continue
        taken = [k for other in found.values() for k in desc.keys & other.keys]
        if desc.name not in desc.keys or taken:
            raise RuntimeError(f"descriptor {desc.name!r}: keys {sorted(desc.keys)} must hold its name and no other's ({taken})")
        found[desc.name] = desc
    return found


DESCRIPTORS: dict[str, Descriptor] = _discover()


def resolve(section: Mapping, dims: Dims) -> tuple[dict, list[Bound]]:
    """(the resolved ``descriptors`` section, the job's descriptors in registry order).

    A descriptor runs when the spec has any of its keys; a flag alone brings its descriptor's
    section in with its defaults (``local_rank`` alone gives ``local_scaling: {}``), appended as
    the spec validation always did. ``section`` itself is not changed."""
    owned = {k for d in DESCRIPTORS.values() for k in d.keys}
    for key in sorted(set(section) - owned):
        raise SpecError(f"{KEY}.{key}", f"is not a known descriptor; expected one of {sorted(owned)}")
    resolved, bound = dict(section), []
    for desc in DESCRIPTORS.values():
        if not desc.keys & set(section):
            continue
        resolved[desc.name] = desc.resolve(dict(section.get(desc.name, {})), dims)
        cfg = {**resolved[desc.name], **{flag: flag in section for flag in sorted(desc.flags)}}
        bound.append(Bound(desc, cfg))
    return resolved, bound


def job_arrays(bound: list[Bound], dims: Dims) -> dict:
    """Every descriptor's arrays fixed per job, in one mapping (a name two descriptors draw is an error)."""
    out: dict = {}
    for desc, cfg in bound:
        mine = desc.arrays(cfg, dims)
        if set(mine) & set(out):
            raise RuntimeError(f"descriptor {desc.name!r} draws arrays {sorted(set(mine) & set(out))} another already drew")
        out.update(mine)
    return out


def chunk_candidates(bound: list[Bound], platform: str) -> list:
    """The chunk sizes the engine may compile, best first: those of the descriptors that take a
    chunk (each gets the one compiled), or ``[None]`` where none does."""
    lists = [desc.chunks(cfg, platform) for desc, cfg in bound if desc.chunks is not None]
    return list(dict.fromkeys(c for chunks in lists for c in chunks)) or [None]


def with_chunk(bound: list[Bound], chunk) -> list[Bound]:
    """``bound`` as one compiled program runs it: ``chunk`` in the cfg of each descriptor that takes one."""
    return [Bound(d, {**cfg, "chunk": chunk}) if d.chunks is not None else Bound(d, cfg) for d, cfg in bound]


def display(bound: list[Bound]) -> str:
    """One line for people: what the descriptors compute and how."""
    return " + ".join(d.display(cfg) if d.display is not None else d.name for d, cfg in bound)


def marker(bound: list[Bound]) -> dict:
    """The descriptors' own keys of a commit marker."""
    out: dict = {}
    for d, cfg in bound:
        out.update(d.marker(cfg) if d.marker is not None else {})
    return out


__all__ = ["DESCRIPTORS", "Bound", "Descriptor", "Dims", "chunk_candidates", "display", "job_arrays", "marker",
           "resolve", "with_chunk"]
