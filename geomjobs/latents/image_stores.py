"""Where the images of ``latents: {kind: images}`` come from (:data:`STORES`, by ``source``).

Sample i (i < count) is image i of the source:
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
  they are) or binary (the bytes of a PNG or NPY file, decoded as above); ids from ``id_column``
  (default ``row:<index>``).
"""
from __future__ import annotations

import io
import math

import numpy as np

from geomjobs.errors import SpecError
from geomjobs.latents.sources import LazyDataset, open_latent_dataset
from geomjobs.zoo.digits import digits_images

IMAGE_SUFFIXES = (".png", ".npy")


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

    def check(self, count: int) -> None:
        """Raise SpecError for a bad one among the first ``count`` images (before any work)."""

    def image_ids(self, idx: np.ndarray) -> list[str]:
        raise NotImplementedError

    def load(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), *image_shape) float32."""
        raise NotImplementedError


class DigitsImages(ImageStore):
    def __init__(self, image_shape):
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
        self._ds = LazyDataset(uri, ds)
        try:
            self.load(np.array([0]))
        except ValueError as e:
            raise SpecError("latents.column", str(e)) from None

    def image_ids(self, idx):
        if self.id_column is None:
            return [f"row:{int(i)}" for i in idx]
        col = self._ds().take(np.asarray(idx, np.int64), columns=[self.id_column]).column(self.id_column)
        return [None if v is None else str(v) for v in col.to_pylist()]

    def load(self, idx):
        idx = np.asarray(idx, np.int64)
        col = self._ds().take(idx, columns=[self.column]).column(self.column)
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


STORES = {
    "digits": lambda lat, image_shape: DigitsImages(image_shape),
    "folder": lambda lat, image_shape: FolderImages(lat["uri"], image_shape),
    "parquet": lambda lat, image_shape: ParquetImages(lat["uri"], lat["column"], lat.get("id_column"), image_shape),
}
