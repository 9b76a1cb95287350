"""diffusers (Flax) generators: ``diffusers-vae-decoder`` and ``diffusers-unet`` (SPEC section 1).

Both load weights through the real ``from_pretrained`` of diffusers' Flax classes
(``FlaxAutoencoderKL``, ``FlaxUNet2DConditionModel``) from a diffusers model folder on local disk
or on gs:// (copied once into a local cache, see :func:`local_model_folder`). Nothing is
downloaded from a hub. Latents are channels-first ``(C, h, w)``, as diffusers takes them.

``diffusers-vae-decoder``: G(z) = vae.decode(z / scaling_factor + shift_factor).sample[0], the raw
decoder output (3, H, W), ``scaling_factor`` (and ``shift_factor``, SD3-style VAEs only) from the
VAE's config. ``FlaxAutoencoderKL.decode`` in diffusers 0.39 takes NCHW *or* NHWC and guesses which
by testing ``latents.shape[-1] != latent_channels``: an NCHW latent whose width equals the channel
count (4 x 4 x 4, say) is silently read as NHWC. We always hand it NHWC, so it never transposes,
and it returns NCHW.

``diffusers-unet``: G(z) = the UNet's output at ``timestep`` for latent z = x_t, conditioned on one
prompt embedding (``prediction: eps``), or x0_hat = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)
(``prediction: x0``). abar_t comes from the scheduler config (the pipeline's
``scheduler/scheduler_config.json`` next to ``subfolder``, or the spec's ``scheduler_config``);
a ``v_prediction`` or ``sample`` model's output is converted to eps / x0 by the usual identities.
Prompt embeddings: the text encoder's last hidden states (CLIP for SD 1.x: (n, 77, 768)), as an
.npz with one array ``embeddings`` of shape (num_prompts, seq, dim), or a Parquet file with one
row per prompt (column ``embedding``: a (seq, dim) list of lists; optional integer column
``prompt_id``). A job uses one prompt, row ``prompt_index`` of the file, and each record's
``prompt_id`` is that row's ``prompt_id`` (the row number for an .npz). With ``guidance_scale`` s and
``negative_embedding_index`` (the unconditional / negative prompt, same file) the output is
classifier-free guided: out = out_uncond + s (out_cond - out_uncond), both in one batch of 2.

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

diffusers' Flax classes exist up to diffusers 0.39.x (removed in 0.40): ``pip install
'geomjobs[diffusers]'``. ``from_pretrained(from_pt=True)`` needs torch; a folder with only
PyTorch weights is refused with a message saying so.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.generators.base import Generator, output_shape_of
from geomjobs.spec import SpecError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}
REMAT = ("none", "dots", "full")
PREDICTIONS = ("eps", "x0")
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
CACHE_ENV = "GEOMJOBS_CACHE_DIR"


# --------------------------------------------------------------------------------------------
# shared: diffusers import, folders (local or remote), dtypes, remat
# --------------------------------------------------------------------------------------------

def _diffusers(kind: str):
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


def local_model_folder(uri: str, parts: tuple[str, ...] = (), optional: tuple[str, ...] = ()) -> str:
    """A local folder holding the model folder ``uri`` (diffusers reads local folders only).

    A local path is returned as it is. A remote one (gs://, or any fsspec URI) is copied once
    into ``$GEOMJOBS_CACHE_DIR`` (default ~/.cache/geomjobs/models): only the subfolders
    ``parts`` (required) and ``optional`` (copied when present), or the whole folder when
    ``parts`` is empty. The cache entry is named by a hash of the URI and of every file's name,
    size and version tag (generation / etag / md5 / mtime), so a changed remote file is fetched
    again, and it is written to a temporary folder then renamed, so concurrent workers on one
    host never see half a copy.
    """
    from geomjobs.sink.fs import filesystem, is_local, normalize_uri

    if is_local(uri):
        p = normalize_uri(uri)
        if not os.path.isdir(p):
            raise SpecError("model.path", f"diffusers model folder '{uri}' does not exist")
        return p
    fs, root = filesystem(uri)
    root = root.rstrip("/")
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

    def version(info):
        for k in ("generation", "etag", "md5Hash", "ETag", "mtime", "LastModified", "created"):
            if info.get(k) is not None:
                return str(info[k])
        return ""

    rel = {p: p[len(root):].lstrip("/") for p in files}
    ident = json.dumps([uri, sorted((rel[p], int(i.get("size") or 0), version(i)) for p, i in files.items())])
    dest = cache_root() / hashlib.sha256(ident.encode()).hexdigest()[:24]
    if (dest / ".complete").is_file():
        return str(dest)
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
    return str(dest)


def _dtype(model: dict) -> Any:
    name = model.get("dtype", "float32")
    if name not in DTYPES:
        raise SpecError("model.dtype", f"expected one of {sorted(DTYPES)}, got {name!r}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise SpecError("model.dtype", "float64 needs 64-bit JAX: set execution.dtype: float64")
    return DTYPES[name]


def _out_dtype(compute, exec_dtype):
    wide = jnp.dtype(compute) == jnp.float64 or jnp.dtype(exec_dtype) == jnp.float64
    return jnp.float64 if wide else jnp.float32


def cast_params(params, dtype):
    """Floating leaves of a param pytree cast to ``dtype`` (diffusers' to_bf16 calls jax.tree_map,
    removed from JAX)."""
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a), params)


def with_remat(fn, remat: str):
    if remat == "none":
        return fn
    if remat == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_saveable)
    if remat == "full":
        return jax.checkpoint(fn)
    raise SpecError("model.remat", f"expected one of {list(REMAT)}, got {remat!r}")


def _model_folder(model: dict, kind: str, hint_sub: str, optional: tuple[str, ...] = ()):
    """(local root, subfolder or None, local path of the model folder), checked."""
    sub = model.get("subfolder")
    path = model["path"]
    root = local_model_folder(path, (sub,) if sub else (), optional)
    where = os.path.join(root, sub) if sub else root
    if sub and not os.path.isdir(where):
        raise SpecError("model.subfolder", f"'{path}' has no subfolder '{sub}' ('{where}' does not exist)")
    if not os.path.isfile(os.path.join(where, "config.json")):
        hint = f"; for a pipeline folder set subfolder: {hint_sub}" if not sub else ""
        raise SpecError("model.subfolder" if sub else "model.path",
                        f"'{where}' has no config.json: expected a diffusers {kind} folder (written by save_pretrained){hint}")
    if not os.path.isfile(os.path.join(where, FLAX_WEIGHTS)):
        found = sorted(f for f in os.listdir(where) if f.endswith((".safetensors", ".bin", ".msgpack")))
        raise SpecError("model.subfolder" if sub else "model.path",
                        f"'{where}' has no Flax weights ({FLAX_WEIGHTS}); found {found or 'no weights'}. "
                        "PyTorch weights need a one-time conversion: from_pretrained(..., from_pt=True) with torch "
                        "installed, then save_pretrained(folder, params=params)")
    return root, sub, where


def _load(cls, root: str, sub: str | None, where: str, dtype):
    kw = {"subfolder": sub} if sub else {}
    with open(os.path.join(where, "config.json")) as f:
        raw = json.load(f)
    found = str(raw.get("_class_name", "")).removeprefix("Flax")
    want = cls.__name__.removeprefix("Flax")
    if found and found != want:   # from_pretrained would load another model's config without a word
        raise SpecError("model.subfolder" if sub else "model.path", f"'{where}' is a {found} folder; expected a folder of {want}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module, params = cls.from_pretrained(root, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
        raise SpecError("model.path", f"cannot load a {cls.__name__} from '{where}': {type(e).__name__}: {e}") from None
    return module, params, raw


def _latent_shape(model: dict, default: tuple[int, int, int], channels: int) -> tuple[int, ...]:
    shape = tuple(int(s) for s in (model.get("latent_shape") or default))
    if len(shape) != 3 or shape[0] != channels or min(shape) < 1:
        raise SpecError("model.latent_shape", f"expected [{channels}, h, w] ({channels} latent channels), got {list(shape)}")
    return shape


def _model_id(model: dict, prefix: str) -> str:
    if model.get("model_id"):
        return str(model["model_id"])
    base = os.path.basename(str(model["path"]).rstrip("/")) or str(model["path"])
    sub = model.get("subfolder")
    return f"{prefix}:{base}" + (f"/{sub}" if sub else "")


def _shape_of(apply, params, shape, dtype, key="model.latent_shape"):
    try:
        return output_shape_of(apply, params, shape, dtype)
    except SpecError:
        raise
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"the model cannot take a latent of shape {list(shape)}: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------------------------
# diffusers-vae-decoder
# --------------------------------------------------------------------------------------------

def vae_decoder_generator(model: dict, dtype=jnp.float32) -> Generator:
    """``kind: diffusers-vae-decoder`` (keys: path, subfolder, dtype, latent_shape, model_id, remat)."""
    diffusers = _diffusers("diffusers-vae-decoder")
    compute = _dtype(model)
    remat = model.get("remat", "none")
    with_remat(lambda x: x, remat)   # check the key before loading anything
    root, sub, where = _model_folder(model, "AutoencoderKL", "vae")
    vae, params, raw = _load(diffusers.FlaxAutoencoderKL, root, sub, where, compute)
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    shape = _latent_shape(model, (cfg.latent_channels, cfg.sample_size // down, cfg.sample_size // down), cfg.latent_channels)
    shift = raw.get("shift_factor")
    return vae_decoder_from_module(vae, params, shape, compute=compute, dtype=dtype, remat=remat,
                                   scaling_factor=float(raw.get("scaling_factor", cfg.scaling_factor)),
                                   shift_factor=0.0 if shift is None else float(shift),
                                   model_id=_model_id(model, "diffusers-vae"))


def vae_decoder_from_module(vae, params, latent_shape, *, compute=jnp.float32, dtype=jnp.float32, remat="none",
                            scaling_factor=None, shift_factor=0.0, model_id="diffusers-vae") -> Generator:
    """The decoder generator of an in-memory FlaxAutoencoderKL ``vae`` and its params (the full
    tree or just ``post_quant_conv`` + ``decoder``): what ``kind: diffusers-vae-decoder`` builds
    after loading, also used by benchmarks/bench_sd.py on random SD-shaped weights."""
    # only the decoder half: the encoder's weights never enter G
    params = cast_params({k: params[k] for k in ("post_quant_conv", "decoder")}, compute)
    scale = float(vae.config.scaling_factor if scaling_factor is None else scaling_factor)
    shift = float(shift_factor)
    out_dtype = _out_dtype(compute, dtype)

    def decode(p, z):
        x = jnp.transpose(z / scale + shift, (1, 2, 0))[None].astype(compute)   # (1, h, w, C): NHWC
        return vae.apply({"params": p}, x, method=vae.decode).sample[0].astype(out_dtype)   # (3, H, W)

    apply = with_remat(decode, remat)
    shape = tuple(latent_shape)
    return Generator(model_id=model_id, apply=apply, params=params, latent_shape=shape,
                     output_shape=_shape_of(apply, params, shape, dtype), dtype=dtype)


def vae_image_encoder(enc: dict):
    """``latents: {kind: images, encoder: {kind: diffusers-vae, path, subfolder, dtype, image_size}}``:
    the VAE's posterior mean of an (H, W, C) image in [0, 1] (PNG pixels / 255), as the latent the
    decoder and the UNet take: z = (mean - shift_factor) * scaling_factor, channels first, the
    inverse of ``diffusers-vae-decoder``'s G(z) = decode(z / scaling_factor + shift_factor).
    The image enters the encoder as 2 x - 1 (diffusers' [-1, 1] convention), NCHW (what
    ``FlaxAutoencoderKL.encode`` takes). Only the encoder half of the weights is kept."""
    from geomjobs.latents.images import ImageEncoder

    key = "latents.encoder"
    diffusers = _diffusers("latents.encoder kind diffusers-vae")
    try:
        compute = _dtype(enc)
        root, sub, where = _model_folder(enc, "AutoencoderKL", "vae")
        vae, params, raw = _load(diffusers.FlaxAutoencoderKL, root, sub, where, compute)
    except SpecError as e:   # the helpers name model.*; here the keys live under latents.encoder
        raise SpecError(f"{key}.{e.key.split('.', 1)[-1]}", e.message) from None
    cfg = vae.config
    down = 2 ** (len(cfg.block_out_channels) - 1)
    size = enc.get("image_size", cfg.sample_size)
    if not isinstance(size, int) or isinstance(size, bool) or size < down or size % down:
        raise SpecError(f"{key}.image_size", f"expected a positive multiple of {down} (the VAE downsamples {down}x), got {size!r}")
    scale = float(raw.get("scaling_factor", cfg.scaling_factor))
    shift = float(raw.get("shift_factor") or 0.0)
    params = cast_params({k: params[k] for k in ("encoder", "quant_conv")}, compute)

    def encode(p, x):
        x = jnp.transpose(2.0 * x - 1.0, (2, 0, 1))[None].astype(compute)            # (1, C, H, W)
        mean = vae.apply({"params": p}, x, method=vae.encode).latent_dist.mean[0]     # (h, w, C)
        return (jnp.transpose(mean, (2, 0, 1)).astype(jnp.float32) - shift) * scale

    h = size // down
    return ImageEncoder(model_id=_model_id(enc, "diffusers-vae-encoder"), apply=encode, params=params,
                        image_shape=(size, size, cfg.in_channels), latent_shape=(cfg.latent_channels, h, h))


# --------------------------------------------------------------------------------------------
# diffusers-unet
# --------------------------------------------------------------------------------------------

def alphas_cumprod(config: dict) -> np.ndarray:
    """abar_0..abar_{T-1} in float64 from a diffusers scheduler config, with diffusers' formulas
    (``CommonSchedulerState.create``): linear, scaled_linear, squaredcos_cap_v2 or trained_betas.
    Raises ValueError for anything else."""
    T = int(config.get("num_train_timesteps", 1000))
    b0, b1 = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
    kind = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = np.asarray(config["trained_betas"], np.float64)
    elif kind == "linear":
        betas = np.linspace(b0, b1, T, dtype=np.float64)
    elif kind == "scaled_linear":
        betas = np.linspace(b0 ** 0.5, b1 ** 0.5, T, dtype=np.float64) ** 2
    elif kind == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], np.float64)
    else:
        raise ValueError(f"beta_schedule {kind!r} is not supported; expected linear, scaled_linear, "
                         "squaredcos_cap_v2 or trained_betas")
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr schedules (abar_{T-1} = 0) are not supported")
    return np.cumprod(1.0 - betas)


def _scheduler_config(model: dict, root: str) -> dict | None:
    if model.get("scheduler_config") is not None:
        return dict(model["scheduler_config"])
    p = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    return None


def load_prompt_embeddings(path: str, key: str = "model.prompt_embeddings") -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (num_prompts, seq, dim), prompt ids (num_prompts,)) from a file, local or remote.

    ``.parquet``: one row per prompt, a column ``embedding`` holding that prompt's (seq, dim)
    hidden states as a list of lists (``pa.list_(pa.list_(pa.float32()))``), and optionally an
    integer column ``prompt_id`` (default: the row number). Otherwise an .npz with an array
    ``embeddings``; the ids are the row numbers."""
    if path.rstrip("/").endswith(".parquet"):
        emb, ids = _parquet_prompt_embeddings(path, key)
    else:
        emb = _npz_prompt_embeddings(path, key)
        ids = np.arange(len(emb))
    if emb.ndim != 3 or not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
        raise SpecError(key, f"'{path}': expected finite float embeddings of shape (num_prompts, seq, dim), "
                             f"got {emb.dtype} {emb.shape}")
    return emb, ids


def _parquet_prompt_embeddings(path: str, key: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geomjobs.sink.fs import open_input

    try:
        with open_input(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise SpecError(key, f"prompt embedding file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"'{path}' is not a readable Parquet file ({type(e).__name__}: {e})") from None
    if "embedding" not in table.column_names:
        raise SpecError(key, f"'{path}' has no column 'embedding' (one (seq, dim) list of lists per prompt); "
                             f"found {table.column_names}")
    col = table.column("embedding")
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise SpecError(key, f"'{path}': column 'embedding' must hold lists of lists (seq, dim), got {col.type}")
    rows = col.to_pylist()
    try:
        emb = np.asarray(rows, np.float32)
    except (ValueError, TypeError):
        raise SpecError(key, f"'{path}': every row of 'embedding' must have the same (seq, dim) shape") from None
    if "prompt_id" in table.column_names:
        ids = table.column("prompt_id").to_pylist()
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SpecError(key, f"'{path}': column 'prompt_id' must hold integers, got {table.column('prompt_id').type}")
        ids = np.asarray(ids, np.int64)
    else:
        ids = np.arange(len(rows))
    return emb, ids


def _npz_prompt_embeddings(path: str, key: str) -> np.ndarray:
    from geomjobs.sink.fs import open_input

    try:
        with open_input(path) as f:
            data = dict(np.load(f, allow_pickle=False))
    except FileNotFoundError:
        raise SpecError(key, f"prompt embedding file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"'{path}' is not a readable .npz ({type(e).__name__}: {e})") from None
    if "embeddings" not in data:
        raise SpecError(key, f"'{path}' has no array 'embeddings' (num_prompts, seq, dim); found {sorted(data)}")
    return data["embeddings"]


def unet_generator(model: dict, dtype=jnp.float32) -> Generator:
    """``kind: diffusers-unet`` (keys: path, subfolder, dtype, timestep, prediction, prompt_embeddings,
    prompt_index, guidance_scale, negative_embedding_index, scheduler_config, latent_shape,
    model_id, remat)."""
    diffusers = _diffusers("diffusers-unet")
    compute = _dtype(model)
    remat = model.get("remat", "none")
    with_remat(lambda x: x, remat)
    prediction = model.get("prediction", "eps")
    if prediction not in PREDICTIONS:
        raise SpecError("model.prediction", f"expected one of {list(PREDICTIONS)}, got {prediction!r}")
    t = model.get("timestep")
    if not isinstance(t, int) or isinstance(t, bool) or t < 0:
        raise SpecError("model.timestep", f"expected an integer >= 0, got {t!r}")
    if "prompt_embeddings" not in model:
        raise SpecError("model.prompt_embeddings", "is required for kind 'diffusers-unet'")
    emb, prompt_ids = load_prompt_embeddings(model["prompt_embeddings"])
    idx = model.get("prompt_index", 0)
    if not 0 <= idx < len(emb):
        raise SpecError("model.prompt_index", f"expected 0..{len(emb) - 1} (the file has {len(emb)} prompts), got {idx}")
    scale = model.get("guidance_scale")
    neg = model.get("negative_embedding_index")
    if scale is not None and neg is None:
        raise SpecError("model.negative_embedding_index", "is required with guidance_scale (the unconditional prompt)")
    if neg is not None and not 0 <= neg < len(emb):
        raise SpecError("model.negative_embedding_index", f"expected 0..{len(emb) - 1}, got {neg}")
    if neg is not None and scale is None:
        raise SpecError("model.guidance_scale", "is required with negative_embedding_index")

    root, sub, where = _model_folder(model, "UNet2DConditionModel", "unet", optional=("scheduler",))
    unet, params, _ = _load(diffusers.FlaxUNet2DConditionModel, root, sub, where, compute)
    cfg = unet.config
    if emb.shape[-1] != cfg.cross_attention_dim:
        raise SpecError("model.prompt_embeddings", f"embeddings have dim {emb.shape[-1]}, the UNet's "
                                                   f"cross_attention_dim is {cfg.cross_attention_dim}")
    sched = _scheduler_config(model, root)
    kind = (sched or {}).get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction", "sample"):
        raise SpecError("model.scheduler_config", f"prediction_type {kind!r} is not supported; expected epsilon, "
                                                  "v_prediction or sample")
    abar = None
    if sched is not None:
        try:
            ab = alphas_cumprod(sched)
        except (ValueError, TypeError) as e:
            raise SpecError("model.scheduler_config", str(e)) from None
        if t >= len(ab):
            raise SpecError("model.timestep", f"expected 0..{len(ab) - 1} (the scheduler has {len(ab)} steps), got {t}")
        abar = float(ab[t])
    if abar is None and (prediction == "x0" or kind != "epsilon"):
        raise SpecError("model.scheduler_config", "prediction x0 needs the noise schedule: give scheduler_config "
                                                  "or a pipeline folder with scheduler/scheduler_config.json")

    shape = _latent_shape(model, (cfg.in_channels, cfg.sample_size, cfg.sample_size), cfg.in_channels)
    rows = [idx] if neg is None else [neg, idx]
    return unet_from_module(unet, params, emb[rows], shape, timestep=t, abar=abar, output_kind=kind,
                            prediction=prediction, guidance_scale=scale, compute=compute, dtype=dtype, remat=remat,
                            model_id=_model_id(model, "diffusers-unet"), prompt_id=int(prompt_ids[idx]))


def unet_from_module(unet, params, context, latent_shape, *, timestep: int, abar: float | None, output_kind="epsilon",
                     prediction="eps", guidance_scale=None, compute=jnp.float32, dtype=jnp.float32, remat="none",
                     model_id="diffusers-unet", prompt_id=None) -> Generator:
    """The generator of an in-memory FlaxUNet2DConditionModel and its params: what ``kind:
    diffusers-unet`` builds after loading (also used by benchmarks/bench_sd.py on random SD-shaped
    weights). ``context``: (1, seq, dim) prompt hidden states, or (2, seq, dim) = (negative,
    prompt) with ``guidance_scale``; ``output_kind``: the scheduler's prediction_type."""
    t, kind = timestep, output_kind
    params = {"unet": cast_params(params, compute), "context": jnp.asarray(context, compute)}
    n_ctx = len(context)
    out_dtype = _out_dtype(compute, dtype)
    s = None if guidance_scale is None else float(guidance_scale)
    sa, s1a = (math.sqrt(abar), math.sqrt(1.0 - abar)) if abar is not None else (1.0, 0.0)

    def forward(p, z):
        x = jnp.broadcast_to(z.astype(compute)[None], (n_ctx, *z.shape))   # (1 or 2, C, h, w): NCHW
        out = unet.apply({"params": p["unet"]}, x, t, p["context"]).sample.astype(out_dtype)
        o = out[0] if s is None else out[0] + s * (out[1] - out[0])
        zz = z.astype(out_dtype)
        if kind == "epsilon":
            eps, x0 = o, (lambda e: (zz - s1a * e) / sa)
        elif kind == "v_prediction":
            eps, x0 = sa * o + s1a * zz, (lambda e: sa * zz - s1a * o)
        else:   # sample: the model predicts x0
            eps, x0 = (zz - sa * o) / s1a, (lambda e: o)
        return eps if prediction == "eps" else x0(eps)

    apply = with_remat(forward, remat)
    shape = tuple(latent_shape)
    return Generator(model_id=model_id, apply=apply, params=params, latent_shape=shape,
                     output_shape=_shape_of(apply, params, shape, dtype), timestep=t, dtype=dtype, prompt_id=prompt_id)
