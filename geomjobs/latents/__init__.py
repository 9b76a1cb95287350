"""Latent sources, looked up by ``latents.kind`` in :data:`BUILDERS`. Each gives ``count``,
``shape`` and, for any array of sample ids, the latents and the extra record columns (grid or
plane coordinates, image ids). Sample i's latent depends only on the spec and i, never on
sharding or batching. A builder takes the (schema-validated) ``latents`` section, never writes
into it, and returns the section with its defaults filled as ``LatentSource.resolved``."""
from __future__ import annotations

import copy

from geomjobs.errors import SpecError
from geomjobs.latents.generated import build_sampled, build_trajectory
from geomjobs.latents.images import build_image_latents
from geomjobs.latents.sources import LatentSource, build_gaussian, build_grid2d, build_parquet, build_plane3

BUILDERS = {"gaussian": build_gaussian, "grid2d": build_grid2d, "plane3": build_plane3,
            "parquet": build_parquet, "images": build_image_latents,
            "sampled": build_sampled, "trajectory": build_trajectory}


def build_latents(lat: dict) -> LatentSource:
    """The latent source of a (validated) spec's ``latents`` section."""
    kind = lat["kind"]
    if kind not in BUILDERS:
        raise SpecError("latents.kind", f"unknown latent kind '{kind}'; expected one of {sorted(BUILDERS)}")
    src = BUILDERS[kind](lat)
    if not src.resolved:
        src.resolved = copy.deepcopy(lat)
    return src


__all__ = ["BUILDERS", "LatentSource", "build_latents"]
