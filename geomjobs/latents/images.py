"""``latents: {kind: images}``: latents made by encoding images, optionally forward-diffused.

This is the paper's recipe for reward-model training data (docs/reward.md): encode images with a
model's encoder (its posterior mean), then diffuse them to a fixed or random timestep.

Spec keys::

    latents:
      kind: images
      source: digits            # digits | folder | parquet
      uri: path/or/gs://...     # folder and parquet only: the folder / the Parquet dataset
      column: pixels            # parquet only: one image per row
      id_column: name           # parquet only, optional: image ids from this column (default 'row:<index>')
      encoder: vae-digits       # a name in ENCODERS; the latent is the encoder mean; or a diffusers VAE:
      # encoder: {kind: diffusers-vae, path: pipeline/or/gs://..., subfolder: vae, dtype: float32,
      #           image_size: 512}   # z = (posterior mean - shift_factor) * scaling_factor, [C, h, w]
      count: 1000               # optional; default (and maximum): every image of the source
      diffuse:                  # optional; without it the latent is the encoding z_0 itself
        t: 100                  # an integer in [0, T-1], or "random": t_i ~ U{0..T-1} per sample
        seed: 0                 # default 0
        schedule: {kind: linear, T: 1000, beta_start: 1.0e-4, beta_end: 0.02}   # the defaults

Sources (sample i is image i of the source; the rules for each): :mod:`.image_stores`. Encoders:
:mod:`geomjobs.generators.encoders`.

Forward diffusion (DDPM, Ho et al. 2020; timesteps numbered 0..T-1; the formulas of
:mod:`geomjobs.diffusion`)::

    beta_t = linspace(beta_start, beta_end, T)[t]                       (kind linear, the default:
             T = 1000, 1e-4 .. 0.02, DDPM's schedule)
    beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)[t]^2         (kind scaled_linear: Stable
             Diffusion's, usually with beta_start = 0.00085, beta_end = 0.012)
    abar_t = prod_{s <= t} (1 - beta_s)                                 (in float64)
    z_t    = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps

with eps = ``numpy.random.default_rng([seed, i]).standard_normal(latent_shape)`` (the very latent
``{kind: gaussian, seed: seed}`` gives sample i) and, for ``t: random``,
t_i = ``numpy.random.default_rng([seed, i, 1]).integers(0, T)``. So sample i's latent depends only
on the spec and i, never on sharding or batching: encodings are computed in fixed blocks of
:data:`ENCODE_BLOCK` consecutive ids (always the same batch shape and contents), the diffusion in
float64 NumPy.

Record columns: ``image_id`` (string), ``diffusion_t`` (int32) and ``noise_seed`` (int64, the
spec's ``diffuse.seed``; eps is drawn from (noise_seed, sample_id)); the last two are null without
``diffuse``.

Defaults (``count``, ``diffuse.seed``, ``diffuse.schedule``) are filled into
``ImageLatents.resolved`` (a new mapping; the spec's section is left as it is), so the stored spec
can say exactly what ran. The keys each source takes, and the types, are checked by the job
schema; :func:`build_image_latents` checks what depends on values (t <= T - 1, beta_end >=
beta_start) and on the data (counts, image shapes).
"""
from __future__ import annotations

import collections
import copy
import dataclasses

import numpy as np

from geomjobs import diffusion
from geomjobs.errors import SpecError
from geomjobs.generators.base import ImageEncoder
from geomjobs.generators.encoders import get_encoder
from geomjobs.latents.image_stores import STORES, ImageStore
from geomjobs.latents.sources import LatentSource

DEFAULT_SCHEDULE = diffusion.DEFAULT_SCHEDULE
ENCODE_BLOCK = 64             # ids [64 b, 64 b + 64) are always encoded together, as one batch
CACHE_BYTES = 1 << 27         # encodings kept per process (128 MiB)


def diffusion_noise(ids, seed: int, shape) -> np.ndarray:
    """eps for each sample id, (len(ids), *shape) float64: default_rng([seed, i]).standard_normal(shape)."""
    shape = tuple(shape)
    if len(ids) == 0:
        return np.zeros((0, *shape))
    return np.stack([np.random.default_rng([int(seed), int(i)]).standard_normal(shape) for i in ids])


def diffusion_timesteps(ids, t, seed: int, T: int) -> np.ndarray:
    """t for each sample id (int64): the fixed t, or default_rng([seed, i, 1]).integers(0, T) for t == "random"."""
    if t == "random":
        return np.array([np.random.default_rng([int(seed), int(i), 1]).integers(0, T) for i in ids], np.int64)
    return np.full(len(ids), int(t), np.int64)


# --------------------------------------------------------------------------------------------
# the latent source
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageLatents(LatentSource):
    store: ImageStore = None
    encoder: ImageEncoder = None
    diffuse: dict | None = None       # {"t": int | "random", "seed": int, "schedule": {...}} or None

    def __post_init__(self):
        self._abar = diffusion.abar(self.diffuse["schedule"]) if self.diffuse else None
        self._fn = None
        self._cache: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fn"], state["_cache"] = None, collections.OrderedDict()
        return state

    def _encode_fn(self):
        if self._fn is None:
            import jax
            import jax.numpy as jnp

            enc = self.encoder
            f = jax.jit(jax.vmap(enc.apply, in_axes=(None, 0)))
            self._fn = lambda x: np.asarray(f(enc.params, jnp.asarray(x, jnp.float32)), np.float64)
        return self._fn

    def _block(self, b: int) -> np.ndarray:
        """Encodings of ids [b * ENCODE_BLOCK, ...) (ENCODE_BLOCK rows; past ``count``, zero images)."""
        if b in self._cache:
            self._cache.move_to_end(b)
            return self._cache[b]
        lo, hi = b * ENCODE_BLOCK, min((b + 1) * ENCODE_BLOCK, self.count)
        x = self.store.load(np.arange(lo, hi))
        if len(x) < ENCODE_BLOCK:   # the same batch shape for every block: one compile, batch-independent rows
            x = np.concatenate([x, np.zeros((ENCODE_BLOCK - len(x), *x.shape[1:]), x.dtype)])
        z = self._encode_fn()(x)
        self._cache[b] = z
        max_blocks = max(1, CACHE_BYTES // max(z.nbytes, 1))
        while len(self._cache) > max_blocks:
            self._cache.popitem(last=False)
        return z

    def encodings(self, ids) -> np.ndarray:
        """z_0 for each sample id: (len(ids), *shape) float64."""
        ids = np.asarray(ids, np.int64)
        out = np.zeros((len(ids), *self.shape), np.float64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.count):
            raise IndexError(f"sample ids must lie in 0..{self.count - 1}")
        for b in np.unique(ids // ENCODE_BLOCK):
            sel = (ids // ENCODE_BLOCK) == b
            out[sel] = self._block(int(b))[ids[sel] - b * ENCODE_BLOCK].reshape(-1, *self.shape)
        return out

    def timesteps(self, ids) -> np.ndarray | None:
        if not self.diffuse:
            return None
        return diffusion_timesteps(ids, self.diffuse["t"], self.diffuse["seed"], len(self._abar))

    def latents(self, ids):
        z0 = self.encodings(ids)
        if not self.diffuse:
            return z0
        eps = diffusion_noise(ids, self.diffuse["seed"], self.shape)
        abar = self._abar[self.timesteps(ids)].reshape((-1,) + (1,) * len(self.shape))
        return diffusion.forward_diffuse(z0, abar, eps)

    def columns(self, ids):
        n = len(ids)
        cols = {"image_id": self.store.image_ids(ids)}
        if self.diffuse:
            cols["diffusion_t"] = [int(t) for t in self.timesteps(ids)]
            cols["noise_seed"] = [int(self.diffuse["seed"])] * n
        else:
            cols["diffusion_t"] = [None] * n
            cols["noise_seed"] = [None] * n
        return cols


def resolve_diffuse(d: dict | None) -> dict | None:
    """The ``diffuse`` section with its defaults (seed 0, :data:`DEFAULT_SCHEDULE`), a new mapping,
    checked for what the schema cannot say: t <= T - 1 and beta_end >= beta_start."""
    if d is None:
        return None
    d = {"seed": 0, **copy.deepcopy(d)}
    d["schedule"] = sched = {**DEFAULT_SCHEDULE, **d.get("schedule", {})}
    b0, b1 = sched["beta_start"], sched["beta_end"]
    if b1 < b0:
        raise SpecError("latents.diffuse.schedule.beta_end", f"expected beta_end >= beta_start = {b0}, got {b1}")
    T, t = int(sched["T"]), d["t"]
    if t != "random" and not t <= T - 1:
        raise SpecError("latents.diffuse.t", f"expected an integer in [0, {T - 1}] (T = {T}) or \"random\", got {t!r}")
    return d


def build_image_latents(lat: dict) -> ImageLatents:
    """The ``images`` latent source of a schema-validated spec's ``latents`` section.

    Raises :class:`SpecError` naming the key for anything wrong, before any image is encoded;
    the section with its defaults filled is the source's ``resolved``.
    """
    diffuse = resolve_diffuse(lat.get("diffuse"))
    encoder = get_encoder(lat["encoder"])
    store = STORES[lat["source"]](lat, encoder.image_shape)
    count = lat.get("count", store.count)
    if count > store.count:
        raise SpecError("latents.count", f"asked for {count} images but source '{lat['source']}' has {store.count}")
    store.check(count)
    resolved = {**copy.deepcopy(lat), "count": count, **({"diffuse": diffuse} if diffuse else {})}
    return ImageLatents(int(count), tuple(encoder.latent_shape), store=store, encoder=encoder,
                        diffuse=copy.deepcopy(diffuse), resolved=resolved)
