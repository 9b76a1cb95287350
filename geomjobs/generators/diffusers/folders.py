"""What the diffusers generators and encoder share: the diffusers import, model folders (local or
remote, copied once into a local cache), loading (Flax weights through ``from_pretrained``,
PyTorch safetensors through :mod:`.pytorch_weights`; a folder with both loads the Flax ones),
dtypes and remat.

dtypes: ``dtype: float32 | bfloat16 | float64`` is the params' and activations' dtype (float64
needs ``execution.dtype: float64``; it exists for CPU references). Params are cast here with
``jax.tree_util.tree_map``: diffusers' ``to_bf16``/``to_fp32`` call the removed ``jax.tree_map``.
The latent is cast to that dtype inside G and G's output is cast back to float32 (float64 when
the job or model runs in float64). So with bfloat16 the forward pass and the VJP sweep run in
bf16, while the cotangents (rows of W) meet a float32 output and the VJP rows come back in the
latent's float32: the k x d matrix and its SVD are float32.

``remat: none | dots | full``: wrap G in ``jax.checkpoint`` (``dots`` saves only convolution and
matmul outputs and recomputes norms and activations in the backward pass; ``full`` saves nothing
and re-runs the forward pass inside each chunk of cotangents). See benchmarks/bench_sd.py.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from geomjobs.errors import SpecError
from geomjobs.generators.base import output_shape_of
from geomjobs.generators.diffusers import pytorch_weights

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
REMAT = ("none", "dots", "full")
FLAX_WEIGHTS = pytorch_weights.FLAX_WEIGHTS
CACHE_ENV = "GEOMJOBS_CACHE_DIR"
VERSION_KEYS = ("generation", "etag", "md5Hash", "ETag", "mtime", "LastModified", "created")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """How a diffusers generator computes: ``compute`` is the params' and activations' dtype,
    ``dtype`` the job's (latents), ``remat`` the checkpoint policy (module doc)."""
    compute: Any = jnp.float32
    dtype: Any = jnp.float32
    remat: str = "none"

    @property
    def out(self):
        """G's output dtype: float64 when the model or the job runs in float64, else float32."""
        wide = jnp.dtype(self.compute) == jnp.float64 or jnp.dtype(self.dtype) == jnp.float64
        return jnp.float64 if wide else jnp.float32


def import_diffusers(kind: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import diffusers
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # noqa: F401
    except ImportError as e:
        raise SpecError("model.kind", f"kind '{kind}' needs diffusers>=0.31,<0.40 with its Flax classes "
                                      f"(pip install 'geomjobs[diffusers]'): {e}") from None
    diffusers.utils.logging.set_verbosity_error()   # one deprecation warning per Flax module setup
    return diffusers


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "geomjobs" / "models")


def local_model_folder(uri: str, parts: tuple[str, ...] = (), optional: tuple[str, ...] = (), select=None) -> str:
    """A local folder holding the model folder ``uri`` (diffusers reads local folders only).

    A local path is returned as it is. A remote one (gs://, or any fsspec URI) is copied once
    into ``$GEOMJOBS_CACHE_DIR`` (default ~/.cache/geomjobs/models): only the subfolders
    ``parts`` (required) and ``optional`` (copied when present), or the whole folder when
    ``parts`` is empty. The cache entry is named by a hash of the URI and of every file's name,
    size and version tag (generation / etag / md5 / mtime), so a changed remote file is fetched
    again, and it is written to a temporary folder then renamed, so concurrent workers on one
    host never see half a copy. ``select`` (names -> names to copy), when given, picks the files
    of the model folder itself (``parts[0]``, or the root): the weights the loader will read, not
    every format the folder holds (:func:`pytorch_weights.keep_for_copy`).
    """
    from geomjobs.sink.fs import filesystem, is_local, normalize_uri

    if is_local(uri):
        p = normalize_uri(uri)
        if not os.path.isdir(p):
            raise SpecError("model.path", f"diffusers model folder '{uri}' does not exist")
        return p
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    files = _remote_files(fs, uri, root, parts, optional)
    if select is not None:
        files = _selected(files, f"{root}/{parts[0]}" if parts else root, select)
    rel = {p: p[len(root):].lstrip("/") for p in files}
    ident = json.dumps([uri, sorted((rel[p], int(i.get("size") or 0), _version(i)) for p, i in files.items())])
    dest = cache_root() / hashlib.sha256(ident.encode()).hexdigest()[:24]
    if not (dest / ".complete").is_file():
        _copy_into(fs, rel, dest, uri)
    return str(dest)


def _version(info: dict) -> str:
    for k in VERSION_KEYS:
        if info.get(k) is not None:
            return str(info[k])
    return ""


def _selected(files: dict[str, dict], folder: str, select) -> dict[str, dict]:
    """``files`` less those directly in ``folder`` that ``select`` (their names -> the names to keep) drops."""
    folder = folder.rstrip("/")
    here = {p.rsplit("/", 1)[-1]: p for p in files if p.rsplit("/", 1)[0] == folder}
    keep = set(select(sorted(here)))
    return {p: i for p, i in files.items() if p not in here.values() or p.rsplit("/", 1)[-1] in keep}


def _remote_files(fs, uri: str, root: str, parts, optional) -> dict[str, dict]:
    """{remote path: file info} of the subfolders to copy."""
    try:
        if not fs.isdir(root):
            raise SpecError("model.path", f"diffusers model folder '{uri}' does not exist")
        files: dict[str, dict] = {}
        for sub in (parts or ("",)) + tuple(optional):
            where = f"{root}/{sub}" if sub else root
            if sub and not fs.isdir(where):
                if sub in optional:
                    continue
                raise SpecError("model.subfolder", f"'{uri}' has no subfolder '{sub}'")
            files.update(fs.find(where, detail=True))
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001 - network / auth errors
        raise SpecError("model.path", f"cannot list '{uri}': {type(e).__name__}: {e}") from None
    return files


def _copy_into(fs, rel: dict[str, str], dest: Path, uri: str) -> None:
    """Copy remote files to ``dest`` through a temporary folder renamed into place."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=dest.parent))
    try:
        for p, r in rel.items():
            target = tmp / r
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get(p, str(target))
        (tmp / ".complete").write_text(uri + "\n")
        try:
            os.replace(tmp, dest)
        except OSError:   # another process finished the same copy first
            if not (dest / ".complete").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def compute_dtype(model: dict) -> Any:
    """The ``dtype`` key's JAX dtype (default float32); float64 needs 64-bit JAX."""
    name = model.get("dtype", "float32")
    if name not in DTYPES:
        raise SpecError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise SpecError("model.dtype", "float64 needs 64-bit JAX: set execution.dtype: float64")
    return DTYPES[name]


def cast_params(params, dtype):
    """Floating leaves of a param pytree cast to ``dtype`` (diffusers' to_bf16 calls jax.tree_map,
    removed from JAX). ShapeDtypeStruct leaves (params planned, never held: benchmarks) stay
    abstract, in ``dtype``."""
    def cast(a):
        if isinstance(a, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(a.shape, dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
        return jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a)
    return jax.tree_util.tree_map(cast, params)


def with_remat(fn, remat: str):
    if remat == "none":
        return fn
    if remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable)
    if remat == "full":
        return jax.checkpoint(fn)
    raise SpecError("model.remat", f"expected one of {list(REMAT)}, got {remat!r}")


def model_folder(model: dict, kind: str, hint_sub: str, optional: tuple[str, ...] = ()):
    """(local root, subfolder or None, local path of the model folder), checked."""
    sub = model.get("subfolder")
    path = model["path"]
    key = "model.subfolder" if sub else "model.path"
    root = local_model_folder(path, (sub,) if sub else (), optional,
                              select=lambda names: pytorch_weights.keep_for_copy(names, key, path))
    where = os.path.join(root, sub) if sub else root
    if sub and not os.path.isdir(where):
        raise SpecError("model.subfolder", f"'{path}' has no subfolder '{sub}' ('{where}' does not exist)")
    if not os.path.isfile(os.path.join(where, "config.json")):
        hint = f"; for a pipeline folder set subfolder: {hint_sub}" if not sub else ""
        raise SpecError(key, f"'{where}' has no config.json: expected a diffusers {kind} folder (written by save_pretrained){hint}")
    found = os.listdir(where)
    kind, files = pytorch_weights.choose_weights(found)
    if kind not in ("flax", "safetensors"):
        raise pytorch_weights.weights_error(kind, files, where, key, found)
    return root, sub, where


def load_pretrained(cls, folder: tuple[str, str | None, str], dtype):
    """(module, params, raw config.json) of a diffusers Flax class from a checked
    :func:`model_folder` (root, subfolder, path): Flax weights through ``from_pretrained`` (params as
    stored), else PyTorch safetensors through :func:`pytorch_weights.load_pytorch` (params in ``dtype``)."""
    root, sub, where = folder
    key = "model.subfolder" if sub else "model.path"
    kw = {"subfolder": sub} if sub else {}
    with open(os.path.join(where, "config.json")) as f:
        raw = json.load(f)
    found = str(raw.get("_class_name", "")).removeprefix("Flax")
    want = cls.__name__.removeprefix("Flax")
    if found and found != want:   # from_pretrained would load another model's config without a word
        raise SpecError(key, f"'{where}' is a {found} folder; expected a folder of {want}")
    kind, files = pytorch_weights.choose_weights(os.listdir(where))
    if kind == "safetensors":
        module, params = pytorch_weights.load_pytorch(cls, where, raw, dtype, key, files)
        return module, params, raw
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, params = cls.from_pretrained(root, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
        raise SpecError("model.path", f"cannot load a {cls.__name__} from '{where}': {type(e).__name__}: {e}") from None
    return module, params, raw


def latent_shape(model: dict, default: tuple[int, int, int], channels: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (model.get("latent_shape") or default))
    if len(shape) != 3 or shape[0] != channels or min(shape) < 1:
        raise SpecError("model.latent_shape", f"expected [{channels}, h, w] ({channels} latent channels), got {list(shape)}")
    return shape


def default_model_id(model: dict, prefix: str) -> str:
    if model.get("model_id"):
        return str(model["model_id"])
    base = os.path.basename(str(model["path"]).rstrip("/")) or str(model["path"])
    sub = model.get("subfolder")
    return f"{prefix}:{base}" + (f"/{sub}" if sub else "")


def shape_of(apply, params, shape, dtype, key="model.latent_shape"):
    """G's output shape, or a SpecError naming ``key`` when the model cannot take the latent."""
    try:
        return output_shape_of(apply, params, shape, dtype)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"the model cannot take a latent of shape {list(shape)}: {type(e).__name__}: {e}") from None
