"""``latents: {kind: images}``: latents made by encoding images, optionally forward-diffused.

This is the paper's recipe for reward-model training data (SPEC section 3): encode images with a
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

Sources. Sample i (i < count) is image i of the source:
- ``digits``: scikit-learn's 1797 handwritten digits in ``load_digits`` order, values /16 into
  [0, 1]; image ids ``digits:0000`` .. ``digits:1796``.
- ``folder``: the ``*.png`` and ``*.npy`` files directly in the folder (local, file:// or gs://),
  sorted by file name (Python string order); the file name is the image id. PNG pixels are divided
  by the format's maximum (255, or 65535 for 16-bit) and colour images converted to grey (PIL's
  'L') when the encoder takes one channel; NPY arrays are taken as they are (so they must already
  be in the encoder's input scale: [0, 1] for vae-digits). Every image must hold exactly the
  encoder's image shape (8x8 for vae-digits; NPY arrays may be any shape of that size). A
  diffusers VAE takes RGB (H, W, 3) images in [0, 1] (PNG / 255; it maps them to [-1, 1]
  itself), H = W = ``image_size`` (default: the VAE config's sample_size).
- ``parquet``: the rows of ``column``: lists of numbers (the image flattened row-major, taken as
  they are) or binary (the bytes of a PNG or NPY file, decoded as above).

Forward diffusion (DDPM, Ho et al. 2020; timesteps numbered 0..T-1 as in
:mod:`geomjobs.generators.ddpm`)::

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

Defaults (``count``, ``diffuse.seed``, ``diffuse.schedule``) are written into the spec's
``latents`` section by :func:`build_image_latents`, so the stored spec says exactly what ran.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import math
import numbers
from typing import Any, Callable

import numpy as np

from geomjobs.latents.sources import LatentSource
from geomjobs.spec import SpecError

SOURCES = ("digits", "folder", "parquet")
SCHEDULE_KINDS = ("linear", "scaled_linear")
DEFAULT_SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
ENCODE_BLOCK = 64             # ids [64 b, 64 b + 64) are always encoded together, as one batch
CACHE_BYTES = 1 << 27         # encodings kept per process (128 MiB)
IMAGE_SUFFIXES = (".png", ".npy")


# --------------------------------------------------------------------------------------------
# encoders
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ImageEncoder:
    """An image encoder: ``apply(params, x)`` maps ONE image of ``image_shape`` to its latent of
    ``latent_shape`` (for a VAE, the posterior mean). Batching is done with ``jax.vmap``."""
    model_id: str
    apply: Callable[[Any, Any], Any]
    params: Any
    image_shape: tuple[int, ...]
    latent_shape: tuple[int, ...]


def _vae_digits() -> ImageEncoder:
    from geomjobs.generators.vae import vae_encoder
    return vae_encoder("vae-digits")


ENCODERS: dict[str, Callable[[], ImageEncoder]] = {
    "vae-digits": _vae_digits,   # the zoo beta-VAE's encoder mean, image (8, 8) in [0, 1] -> (8,)
}


def get_encoder(name) -> ImageEncoder:
    """A named encoder (``ENCODERS``), or a mapping ``{kind: diffusers-vae, path, ...}`` for a
    diffusers VAE's encoder (generators.diffusers_models.vae_image_encoder)."""
    if isinstance(name, dict):
        from geomjobs.generators.diffusers_models import vae_image_encoder

        return vae_image_encoder(name)
    if name not in ENCODERS:
        raise SpecError("latents.encoder", f"unknown encoder '{name}'; expected one of {sorted(ENCODERS)}")
    try:
        return ENCODERS[name]()
    except ValueError as e:
        raise SpecError("latents.encoder", str(e)) from None


# --------------------------------------------------------------------------------------------
# forward diffusion
# --------------------------------------------------------------------------------------------

def alpha_bars(schedule: dict) -> np.ndarray:
    """abar_0..abar_{T-1} (float64) of a schedule {kind: linear | scaled_linear, T, beta_start, beta_end}."""
    kind, T = schedule.get("kind", "linear"), int(schedule["T"])
    b0, b1 = float(schedule["beta_start"]), float(schedule["beta_end"])
    if kind == "linear":
        b = np.linspace(b0, b1, T, dtype=np.float64)
    elif kind == "scaled_linear":
        b = np.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=np.float64) ** 2
    else:
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {list(SCHEDULE_KINDS)}")
    return np.cumprod(1.0 - b)


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


def forward_diffuse(z0: np.ndarray, t: np.ndarray, eps: np.ndarray, abar: np.ndarray) -> np.ndarray:
    """z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, per row (float64)."""
    a = np.asarray(abar, np.float64)[np.asarray(t, np.int64)].reshape((-1,) + (1,) * (np.ndim(z0) - 1))
    return np.sqrt(a) * np.asarray(z0, np.float64) + np.sqrt(1.0 - a) * np.asarray(eps, np.float64)


# --------------------------------------------------------------------------------------------
# image sources
# --------------------------------------------------------------------------------------------

def decode_image_bytes(data: bytes, name: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """An image of ``image_shape`` (float32) from the bytes of a PNG or NPY file (rules: module doc)."""
    if data[:6] == b"\x93NUMPY":
        arr = np.load(io.BytesIO(data), allow_pickle=False)
        if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise ValueError(f"image '{name}': NPY array must be numeric, got dtype {arr.dtype}")
        if arr.size != math.prod(image_shape):
            raise ValueError(f"image '{name}' has shape {list(arr.shape)}, expected {math.prod(image_shape)} "
                             f"values (image shape {list(image_shape)})")
        return np.asarray(arr, np.float32).reshape(image_shape)
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many kinds
        raise ValueError(f"image '{name}' is neither an NPY array nor an image PIL can read ({type(e).__name__}: {e})") from None
    return _pil_to_array(img, name, image_shape)


def _pil_to_array(img, name: str, image_shape: tuple[int, ...]) -> np.ndarray:
    channels = image_shape[-1] if len(image_shape) == 3 else 1
    if channels == 1:
        if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            arr, scale = np.asarray(img, np.float64), 65535.0
        elif img.mode == "I":
            arr, scale = np.asarray(img, np.float64), 65535.0
        elif img.mode == "F":
            arr, scale = np.asarray(img, np.float64), 1.0
        else:
            arr, scale = np.asarray(img.convert("L"), np.float64), 255.0
    else:
        arr, scale = np.asarray(img.convert("RGB" if channels == 3 else "RGBA"), np.float64), 255.0
    arr = arr / scale
    if arr.size != math.prod(image_shape) or arr.shape[:2] != tuple(image_shape[:2]):
        raise ValueError(f"image '{name}' is {img.size[0]}x{img.size[1]} (mode {img.mode}), expected "
                         f"{image_shape[1]}x{image_shape[0]} pixels (image shape {list(image_shape)}); resize it first")
    return arr.astype(np.float32).reshape(image_shape)


class ImageStore:
    """The images of a source: ``count`` of them, their ids and pixels, by index."""
    count: int

    def image_ids(self, idx: np.ndarray) -> list[str]:
        raise NotImplementedError

    def load(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), *image_shape) float32."""
        raise NotImplementedError


class DigitsImages(ImageStore):
    def __init__(self, image_shape):
        from geomjobs.generators.vae import digits_images

        self.images = digits_images()
        if tuple(self.images.shape[1:]) != tuple(image_shape):
            raise SpecError("latents.encoder", f"the encoder takes images of shape {list(image_shape)}, "
                                               f"the digits are {list(self.images.shape[1:])}")
        self.count = len(self.images)

    def image_ids(self, idx):
        return [f"digits:{int(i):04d}" for i in idx]

    def load(self, idx):
        return self.images[np.asarray(idx, np.int64)]


class FolderImages(ImageStore):
    def __init__(self, uri: str, image_shape):
        from geomjobs.sink.fs import filesystem

        self.uri, self.image_shape = uri, tuple(image_shape)
        fs, path = filesystem(uri)
        if not fs.isdir(path):
            raise SpecError("latents.uri", f"image folder '{uri}' does not exist or is not a folder")
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        self.names = [n for n in names if n.lower().endswith(IMAGE_SUFFIXES)]
        if not self.names:
            raise SpecError("latents.uri", f"image folder '{uri}' holds no .png or .npy files")
        self.count = len(self.names)
        self._fs, self._path = fs, path.rstrip("/")

    def __getstate__(self):
        return {"uri": self.uri, "image_shape": self.image_shape, "names": self.names, "count": self.count}

    def __setstate__(self, state):
        from geomjobs.sink.fs import filesystem

        self.__dict__.update(state)
        fs, path = filesystem(self.uri)
        self._fs, self._path = fs, path.rstrip("/")

    def check(self, count: int):
        """Check the shape of the first ``count`` images (all of them locally, the first one remotely)."""
        from geomjobs.sink.fs import is_local

        for name in (self.names[:count] if is_local(self.uri) else self.names[:1]):
            try:
                self._check_one(name)
            except ValueError as e:
                raise SpecError("latents.uri", str(e)) from None

    def _check_one(self, name: str):
        with self._fs.open(f"{self._path}/{name}", "rb") as f:
            if name.lower().endswith(".npy"):
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                if math.prod(shape) != math.prod(self.image_shape) or not np.issubdtype(dtype, np.number):
                    raise ValueError(f"image '{name}' has shape {list(shape)} and dtype {dtype}, expected "
                                     f"{math.prod(self.image_shape)} numbers (image shape {list(self.image_shape)})")
            else:
                from PIL import Image

                try:
                    img = Image.open(f)
                    w, h = img.size
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"image '{name}' is not an image PIL can read ({type(e).__name__}: {e})") from None
                if (h, w) != tuple(self.image_shape[:2]):
                    raise ValueError(f"image '{name}' is {w}x{h} pixels, expected {self.image_shape[1]}x"
                                     f"{self.image_shape[0]} (image shape {list(self.image_shape)}); resize it first")

    def image_ids(self, idx):
        return [self.names[int(i)] for i in idx]

    def load(self, idx):
        out = []
        for i in idx:
            name = self.names[int(i)]
            with self._fs.open(f"{self._path}/{name}", "rb") as f:
                out.append(decode_image_bytes(f.read(), name, self.image_shape))
        return np.stack(out) if out else np.zeros((0, *self.image_shape), np.float32)


class ParquetImages(ImageStore):
    def __init__(self, uri: str, column: str, id_column: str | None, image_shape):
        import pyarrow as pa

        from geomjobs.latents.sources import open_latent_dataset

        self.uri, self.column, self.id_column, self.image_shape = uri, column, id_column, tuple(image_shape)
        ds = open_latent_dataset(uri)
        names = ds.schema.names
        for key, col in (("latents.column", column), ("latents.id_column", id_column)):
            if col is not None and col not in names:
                raise SpecError(key, f"column '{col}' is not in '{uri}'; it has {names}")
        typ = ds.schema.field(column).type
        self.binary = pa.types.is_binary(typ) or pa.types.is_large_binary(typ)
        is_list = pa.types.is_list(typ) or pa.types.is_fixed_size_list(typ) or pa.types.is_large_list(typ)
        if not (self.binary or is_list):
            raise SpecError("latents.column", f"column '{column}' must hold lists of numbers (a flattened image per "
                                              f"row) or binary (PNG or NPY file bytes), got {typ}")
        self.count = ds.count_rows()
        if self.count == 0:
            raise SpecError("latents.uri", f"Parquet images '{uri}' have no rows")
        self._ds = ds
        try:
            self.load(np.array([0]))
        except ValueError as e:
            raise SpecError("latents.column", str(e)) from None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_ds"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._ds = None

    def _dataset(self):
        if self._ds is None:
            from geomjobs.latents.sources import open_latent_dataset
            self._ds = open_latent_dataset(self.uri)
        return self._ds

    def image_ids(self, idx):
        if self.id_column is None:
            return [f"row:{int(i)}" for i in idx]
        col = self._dataset().take(np.asarray(idx, np.int64), columns=[self.id_column]).column(self.id_column)
        return [None if v is None else str(v) for v in col.to_pylist()]

    def load(self, idx):
        idx = np.asarray(idx, np.int64)
        col = self._dataset().take(idx, columns=[self.column]).column(self.column)
        out = []
        for i, v in zip(idx, col.to_pylist()):
            name = f"{self.column}[{int(i)}]"
            if v is None:
                raise ValueError(f"image '{name}' in '{self.uri}' is null")
            if self.binary:
                out.append(decode_image_bytes(v, name, self.image_shape))
            else:
                a = np.asarray(v, np.float32)
                if a.size != math.prod(self.image_shape):
                    raise ValueError(f"image '{name}' in '{self.uri}' has {a.size} values, expected "
                                     f"{math.prod(self.image_shape)} (image shape {list(self.image_shape)})")
                out.append(a.reshape(self.image_shape))
        return np.stack(out) if out else np.zeros((0, *self.image_shape), np.float32)


# --------------------------------------------------------------------------------------------
# the latent source
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ImageLatents(LatentSource):
    store: ImageStore = None
    encoder: ImageEncoder = None
    diffuse: dict | None = None       # {"t": int | "random", "seed": int, "schedule": {...}} or None

    def __post_init__(self):
        self._abar = alpha_bars(self.diffuse["schedule"]) if self.diffuse else None
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
        return forward_diffuse(z0, self.timesteps(ids), eps, self._abar)

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


def _check_diffuse(lat: dict) -> dict | None:
    d = lat.get("diffuse")
    if d is None:
        return None
    sched = d.setdefault("schedule", {})
    for k, v in DEFAULT_SCHEDULE.items():
        sched.setdefault(k, v)
    d.setdefault("seed", 0)
    if sched["kind"] not in SCHEDULE_KINDS:
        raise SpecError("latents.diffuse.schedule.kind", f"expected one of {list(SCHEDULE_KINDS)}, got {sched['kind']!r}")
    if isinstance(sched["T"], bool) or not isinstance(sched["T"], numbers.Integral) or sched["T"] < 1:
        raise SpecError("latents.diffuse.schedule.T", f"expected an integer >= 1, got {sched['T']!r}")
    b0, b1 = sched["beta_start"], sched["beta_end"]
    for key, b in (("beta_start", b0), ("beta_end", b1)):
        if isinstance(b, bool) or not isinstance(b, numbers.Real) or not 0 < b < 1:
            raise SpecError(f"latents.diffuse.schedule.{key}", f"expected a number in (0, 1), got {b!r}")
    if b1 < b0:
        raise SpecError("latents.diffuse.schedule.beta_end", f"expected beta_end >= beta_start = {b0}, got {b1}")
    T, t = int(sched["T"]), d.get("t")
    if t != "random":
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t <= T - 1:
            raise SpecError("latents.diffuse.t", f"expected an integer in [0, {T - 1}] (T = {T}) or \"random\", got {t!r}")
    if isinstance(d["seed"], bool) or not isinstance(d["seed"], numbers.Integral) or d["seed"] < 0:
        raise SpecError("latents.diffuse.seed", f"expected an integer >= 0, got {d['seed']!r}")
    return d


def build_image_latents(lat: dict) -> ImageLatents:
    """The ``images`` latent source of a (schema-validated) spec's ``latents`` section.

    Fills the defaults (``count``, ``diffuse.seed``, ``diffuse.schedule``) into ``lat`` and
    raises :class:`SpecError` naming the key for anything wrong, before any image is encoded.
    """
    source = lat.get("source")
    if source not in SOURCES:
        raise SpecError("latents.source", f"expected one of {list(SOURCES)}, got {source!r}")
    needs = {"digits": (), "folder": ("uri",), "parquet": ("uri", "column")}[source]
    for key in ("uri", "column", "id_column"):
        applies = key in needs or (key == "id_column" and source == "parquet")
        if key in lat and not applies:
            raise SpecError(f"latents.{key}", f"does not apply to source '{source}'")
        if key in needs and key not in lat:
            raise SpecError(f"latents.{key}", f"is required for source '{source}'")
    if "encoder" not in lat:
        raise SpecError("latents.encoder", f"is required for kind 'images'; expected one of {sorted(ENCODERS)}")
    diffuse = _check_diffuse(lat)
    encoder = get_encoder(lat["encoder"])
    if source == "digits":
        store = DigitsImages(encoder.image_shape)
    elif source == "folder":
        store = FolderImages(lat["uri"], encoder.image_shape)
    else:
        store = ParquetImages(lat["uri"], lat["column"], lat.get("id_column"), encoder.image_shape)
    count = lat.setdefault("count", store.count)
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
        raise SpecError("latents.count", f"expected an integer >= 1, got {count!r}")
    if count > store.count:
        raise SpecError("latents.count", f"asked for {count} images but source '{source}' has {store.count}")
    if isinstance(store, FolderImages):
        store.check(count)
    return ImageLatents(int(count), tuple(encoder.latent_shape), store=store, encoder=encoder, diffuse=diffuse)
