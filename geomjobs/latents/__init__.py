"""Latent sources, looked up by ``latents.kind``. Each gives ``count``, ``shape`` and, for any
array of sample ids, the latents and the extra record columns (grid or plane coordinates).
Sample i's latent depends only on the spec and i, never on sharding or batching."""
from geomjobs.latents.sources import LatentSource, build_latents

__all__ = ["LatentSource", "build_latents"]
