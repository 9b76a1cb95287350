"""diffusers-format PyTorch weights, read and written without torch: a model folder with
``config.json`` and ``diffusion_pytorch_model.safetensors`` (or a sharded
``diffusion_pytorch_model.safetensors.index.json``), as ``save_pretrained`` of diffusers' PyTorch
``AutoencoderKL`` and ``UNet2DConditionModel`` writes it (nearly every public checkpoint).

**Keys.** The map runs from the Flax module's own parameter tree (``jax.eval_shape(module.init_weights)``,
the tree ``from_pretrained`` checks a Flax checkpoint against) to PyTorch names, so every
parameter the Flax model declares has exactly one PyTorch key (:func:`pytorch_key`):

- a path component ``<name>_<i>`` whose ``<name>`` is a ModuleList / Sequential of the PyTorch
  modules (:data:`LIST_ATTRS`: ``down_blocks``, ``resnets``, ``to_out``, ``net`` ...) is
  ``<name>.<i>``, the inverse of diffusers' ``rename_key`` (``time_embedding.linear_1`` stays: there
  ``linear_1`` is an attribute's name);
- the VAE attention's Flax ``query`` / ``key`` / ``value`` / ``proj_attn`` are PyTorch's ``to_q`` /
  ``to_k`` / ``to_v`` / ``to_out.0``; files with the deprecated PyTorch names (``...attentions.0.query.weight``)
  are read too, as diffusers' PyTorch loader converts them;
- the leaf ``kernel`` / ``scale`` / ``embedding`` is ``weight``; ``bias`` stays.

**Layouts** (:func:`to_pytorch`, :func:`from_pytorch`): a conv kernel (kh, kw, in, out) is
PyTorch's (out, in, kh, kw); a dense kernel (in, out) is the Linear weight (out, in); norm scales
and biases are 1-d in both. These are the rules of diffusers' ``rename_key_and_reshape_tensor``,
which tests/test_safetensors.py runs on every key.

**Reading** (:func:`load_pytorch`): the config is checked (:func:`check_config`: block types the
Flax classes build, PyTorch-only settings they compute), the Flax module is built from it, then the
file's header alone (names, dtypes, shapes) is compared with the tree: a tensor the model does not
have, a missing one, a shape that does not fit the config, or a dtype that is not floating point is
a :class:`SpecError` naming the file and the key, before any tensor is read. Tensors are read one at
a time through ``safetensors``' NumPy API (``safe_open(framework='np')``) and cast to the job's
dtype (model.dtype).

**dtypes.** F32, F16, BF16 and F64 tensors load into float32, bfloat16 or float64: F16 and BF16
widen to float32 exactly; F32 -> bfloat16 rounds to nearest even (the cast the Flax path makes
with ``cast_params``). A BF16 tensor is read through safetensors when it can represent it (0.8 does,
with ml_dtypes); where it cannot, the tensor's raw little-endian bytes are read as uint16 and
shifted 16 bits left into the high half of a uint32, viewed as float32 (bf16 is the top half of
an IEEE float32, so this is exact). What the job *cannot hold*: integer, bool, complex or float8
tensors (refused by dtype); values that are not finite in the file (nan / inf weights); values an
F64 checkpoint has beyond the range of the job's float32 / bfloat16 (they would become inf). The
last two are found as each tensor is read and cast (still before the job computes anything). (A float64 job needs ``execution.dtype:
float64``; :func:`folders.compute_dtype` refuses it otherwise.) Lower precision is the user's choice
(``model.dtype: bfloat16`` rounds an F32 checkpoint), as it is for Flax checkpoints.

**Writing** (:mod:`.pytorch_write`): the inverse, from Flax params and a config.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any

import numpy as np

from geomjobs.errors import SpecError

PT_WEIGHTS = "diffusion_pytorch_model.safetensors"
PT_INDEX = "diffusion_pytorch_model.safetensors.index.json"
FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".ckpt", ".pt", ".pth", ".onnx", ".onnx_data", ".pb", ".gguf")
_VARIANT = re.compile(r"^diffusion_pytorch_model\.([A-Za-z0-9_-]+)\.safetensors$")
_SHARD = re.compile(r"^diffusion_pytorch_model-\d+-of-\d+\.safetensors$")

# ModuleList / Sequential attributes of diffusers' PyTorch AutoencoderKL and UNet2DConditionModel
# (checked against their source in tests/test_safetensors.py)
LIST_ATTRS = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers",
                        "transformer_blocks", "net", "to_out"})
# the Flax VAE attention's names -> PyTorch's Attention (the deprecated PyTorch names are the Flax ones)
VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DEPRECATED = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

# safetensors dtype codes the job can hold, as NumPy dtypes (BF16 via ml_dtypes, a JAX dependency)
FLOAT_CODES = ("F16", "BF16", "F32", "F64")
_CODE_OF = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}

# Config keys the PyTorch class takes and the Flax class does not (or takes and ignores: the Flax
# VAE's act_fn), with the PyTorch default; the Flax class always computes that default. The
# writer writes these defaults; the reader refuses a config that sets one marked True to
# anything else (the Flax model would compute another function). Not checked: precision
# (upcast_attention: SD 2.x sets it; it only changes half-precision attention scores) and what
# pipelines use outside the model's forward pass (shift_factor is read by the decoder
# generator; latents_mean / latents_std / force_upcast are the pipeline's).
PT_ONLY: dict[str, dict[str, tuple[Any, bool]]] = {
    "UNet2DConditionModel": {
        "center_input_sample": (False, True), "downsample_padding": (1, True), "mid_block_scale_factor": (1, True),
        "act_fn": ("silu", True), "norm_num_groups": (32, True), "norm_eps": (1e-05, True),
        "reverse_transformer_layers_per_block": (None, True), "encoder_hid_dim": (None, True),
        "encoder_hid_dim_type": (None, True), "dual_cross_attention": (False, True), "class_embed_type": (None, True),
        "num_class_embeds": (None, True), "upcast_attention": (False, False), "resnet_time_scale_shift": ("default", True),
        "resnet_skip_time_act": (False, True), "resnet_out_scale_factor": (1.0, True), "time_embedding_type": ("positional", True),
        "time_embedding_dim": (None, True), "time_embedding_act_fn": (None, True), "timestep_post_act": (None, True),
        "time_cond_proj_dim": (None, True), "conv_in_kernel": (3, True), "conv_out_kernel": (3, True),
        "attention_type": ("default", True), "class_embeddings_concat": (False, True),
        "mid_block_only_cross_attention": (None, True), "cross_attention_norm": (None, True)},
    "AutoencoderKL": {
        "act_fn": ("silu", True), "shift_factor": (None, False), "latents_mean": (None, False), "latents_std": (None, False),
        "force_upcast": (True, False), "use_quant_conv": (True, True), "use_post_quant_conv": (True, True),
        "mid_block_add_attention": (True, True)},
}
# The block types diffusers' Flax classes build; they build any other name as one of these
# without a word (a PyTorch AttnDownBlock2D would become a DownBlock2D), so the reader refuses it.
BLOCK_TYPES: dict[str, dict[str, tuple]] = {
    "UNet2DConditionModel": {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")},
    "AutoencoderKL": {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)},
}
FLAX_ONLY = frozenset({"use_memory_efficient_attention", "split_head_dim", "dtype"})
CLASS_HINTS = {"UNet2DConditionModel": ("time_embedding.", "conv_in.", "down_blocks.", "mid_block."),
               "AutoencoderKL": ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")}


# ------------------------------------------------------------------------------------------------
# keys and layouts
# ------------------------------------------------------------------------------------------------

def pytorch_key(path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax param path (module doc)."""
    out = []
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if last:
            out.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(part, part))
            continue
        head, _, idx = part.rpartition("_")
        if head in LIST_ATTRS and idx.isdigit():
            out.append(f"{head}.{idx}")
        elif part in VAE_ATTENTION and i == len(path) - 2 and i > 0 and path[i - 1].startswith("attentions_"):
            out.append(VAE_ATTENTION[part])
        else:
            out.append(part)
    return ".".join(out)


def to_pytorch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """A Flax param in PyTorch's layout: conv (kh, kw, in, out) -> (out, in, kh, kw); dense (in, out) -> (out, in)."""
    if path[-1] == "kernel" and a.ndim == 4:
        return a.transpose(3, 2, 0, 1)
    if path[-1] == "kernel" and a.ndim == 2:
        return a.T
    return a


def from_pytorch(path: tuple[str, ...], a: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_pytorch` (diffusers' ``transpose(2, 3, 1, 0)`` and ``.T``)."""
    if path[-1] == "kernel" and a.ndim == 4:
        return a.transpose(2, 3, 1, 0)
    if path[-1] == "kernel" and a.ndim == 2:
        return a.T
    return a


def pytorch_shape(path: tuple[str, ...], shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


def key_map(shapes) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """{PyTorch key: (Flax path, PyTorch shape)} of a Flax param tree (arrays or ShapeDtypeStructs)."""
    from flax.traverse_util import flatten_dict

    out = {}
    for path, s in flatten_dict(_plain(shapes)).items():
        k = pytorch_key(path)
        if k in out:   # two Flax params on one key would make the map lossy
            raise ValueError(f"Flax params {out[k][0]} and {path} both map to PyTorch key {k!r}")
        out[k] = (path, pytorch_shape(path, s.shape))
    return out


def _plain(tree):
    try:
        from flax.core import unfreeze
        return unfreeze(tree)
    except Exception:  # noqa: BLE001 - a plain dict already
        return tree


# ------------------------------------------------------------------------------------------------
# which weights a folder holds
# ------------------------------------------------------------------------------------------------

def is_weights(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def choose_weights(names) -> tuple[str, list[str]]:
    """(kind, files) of a model folder's file names: ``flax`` ([msgpack]; preferred), ``safetensors``
    (one file, or the index and its shards, or the one single-file variant such as
    ``diffusion_pytorch_model.fp16.safetensors`` when there is no plain file), ``variants`` (several
    variants and no plain file: the user must keep one), ``pickle`` (PyTorch .bin / .ckpt only:
    needs torch) or ``none``."""
    names = set(names)
    if FLAX_WEIGHTS in names:
        return "flax", [FLAX_WEIGHTS]
    if PT_WEIGHTS in names:
        return "safetensors", [PT_WEIGHTS]
    if PT_INDEX in names:
        return "safetensors", [PT_INDEX, *sorted(n for n in names if _SHARD.match(n))]
    variants = sorted(n for n in names if _VARIANT.match(n))
    if len(variants) == 1:
        return "safetensors", variants
    if variants:
        return "variants", variants
    pickles = sorted(n for n in names if n.endswith((".bin", ".ckpt", ".pt", ".pth")))
    if pickles:
        return "pickle", pickles
    return "none", []


def weights_error(kind: str, files: list[str], where: str, key: str, found) -> SpecError:
    """The SpecError of a folder whose weights cannot be read (:func:`choose_weights` kind)."""
    if kind == "variants":
        return SpecError(key, f"'{where}' has several weight variants and no {PT_WEIGHTS}: {files}; keep one of them "
                              f"in the folder (or rename it to {PT_WEIGHTS})")
    if kind == "pickle":
        return SpecError(key, f"'{where}' has only PyTorch pickle weights {files}, which need torch to read; geomjobs "
                              f"reads {PT_WEIGHTS} (download the .safetensors files of the checkpoint) or Flax "
                              f"weights ({FLAX_WEIGHTS})")
    weights = sorted(f for f in found if is_weights(f))
    return SpecError(key, f"'{where}' has no weights: expected {PT_WEIGHTS} (diffusers' PyTorch format) or {FLAX_WEIGHTS}; "
                          f"found {weights or sorted(found) or 'an empty folder'}")


def keep_for_copy(names, key: str, uri: str) -> set[str]:
    """The names of a remote model folder worth copying: everything but weights, plus the weights
    the loader will read (:func:`choose_weights`; a folder with Flax, PyTorch and fp16 weights
    copies only the Flax file). Unreadable weights are refused here, before a download."""
    kind, files = choose_weights(names)
    if kind in ("variants", "pickle"):
        raise weights_error(kind, files, uri, key, names)
    return {n for n in names if not is_weights(n)} | set(files)


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def check_config(raw: dict, name: str, where: str, key: str) -> None:
    """Refuse a PyTorch config that sets a key the Flax class does not implement to anything but
    the value it computes (:data:`PT_ONLY`), or names a block the Flax class does not build
    (:data:`BLOCK_TYPES`)."""
    for k, kinds in BLOCK_TYPES.get(name, {}).items():
        for i, t in enumerate(raw.get(k) or ()):
            if t not in kinds:
                raise SpecError(key, f"'{os.path.join(where, 'config.json')}' has {k}[{i}]: {json.dumps(t)}; diffusers' Flax "
                                     f"{name} builds only {', '.join(kinds)}")
    for k, (default, checked) in PT_ONLY.get(name, {}).items():
        if checked and k in raw and not _same(raw[k], default):
            raise SpecError(key, f"'{os.path.join(where, 'config.json')}' sets {k}: {json.dumps(raw[k])}; diffusers' Flax "
                                 f"{name} computes only {k}: {json.dumps(default)}, so this model cannot be run here")


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _header(path: str) -> tuple[dict, int]:
    """(the safetensors JSON header, where the data starts): the first 8 bytes are the header's
    little-endian length."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def read_bf16_raw(path: str, key: str) -> np.ndarray:
    """A BF16 tensor as float32 from the file's raw bytes: little-endian uint16, widened to uint32
    and shifted 16 bits left (bf16 is the high half of a float32), viewed as float32: exact."""
    head, start = _header(path)
    begin, end = head[key]["data_offsets"]
    with open(path, "rb") as f:
        f.seek(start + begin)
        u16 = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (u16.astype("<u4") << 16).view("<f4").reshape(head[key]["shape"])


def _read(handle, path: str, key: str, code: str) -> np.ndarray:
    """One tensor through safetensors' NumPy API; BF16 as float32 (raw bytes where the API cannot)."""
    if code != "BF16":
        return handle.get_tensor(key)
    try:
        a = handle.get_tensor(key)
    except Exception:  # noqa: BLE001 - a safetensors without a NumPy bf16
        return read_bf16_raw(path, key)
    return a.astype(np.float32) if a.dtype.name == "bfloat16" else read_bf16_raw(path, key)


class _Tensors:
    """The tensors of a folder's safetensors file(s): {key: (file, code, shape)} from the headers."""

    def __init__(self, where: str, files: list[str], key: str):
        self.where, self.key = where, key
        self.index = os.path.join(where, files[0])
        self.entries: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        paths = [os.path.join(where, f) for f in files]
        if files[0] == PT_INDEX:
            try:
                with open(self.index) as f:
                    wanted = sorted(set(json.load(f)["weight_map"].values()))
            except Exception as e:  # noqa: BLE001
                raise SpecError(key, f"'{self.index}' is not a readable index ({type(e).__name__}: {e})") from None
            absent = [w for w in wanted if not os.path.isfile(os.path.join(where, w))]
            if absent:
                raise SpecError(key, f"'{self.index}' names shard '{absent[0]}', which is not in '{where}'")
            paths = [os.path.join(where, w) for w in wanted]
        for p in paths:
            try:
                head = _header(p)[0]
            except Exception as e:  # noqa: BLE001 - truncated / not safetensors
                raise SpecError(key, f"'{p}' is not a readable safetensors file ({type(e).__name__}: {e})") from None
            for k, v in head.items():
                if k != "__metadata__":
                    self.entries[k] = (p, str(v["dtype"]), tuple(int(s) for s in v["shape"]))
        for k in list(self.entries):   # deprecated attention names, as diffusers' PyTorch loader reads them
            m = _DEPRECATED.match(k)
            if m and f"{m[1]}.{VAE_ATTENTION[m[2]]}.{m[3]}" not in self.entries:
                self.entries[f"{m[1]}.{VAE_ATTENTION[m[2]]}.{m[3]}"] = (*self.entries.pop(k), k)

    def file_of(self, k: str) -> str:
        return self.entries[k][0] if k in self.entries else self.index


def load_pytorch(cls, where: str, raw: dict, dtype, key: str, files: list[str]):
    """(module, params) of the diffusers Flax class ``cls`` from the PyTorch safetensors ``files``
    of the folder ``where`` (its config ``raw``), params cast to ``dtype``; a :class:`SpecError`
    naming ``key`` for anything that does not fit (module doc)."""
    import warnings

    import jax

    name = cls.__name__.removeprefix("Flax")
    check_config(raw, name, where, key)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = cls.from_config(raw, dtype=dtype)
            shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
    except Exception as e:  # noqa: BLE001 - diffusers raises many kinds
        raise SpecError(key, f"'{os.path.join(where, 'config.json')}' does not give a {name}: {type(e).__name__}: {e}") from None
    return module, read_params(where, files, shapes, name, dtype, key)


def read_params(where: str, files: list[str], shapes, name: str, dtype, key: str):
    """The Flax param tree of the model ``name`` whose param shapes are ``shapes`` (a tree of
    ShapeDtypeStructs), read from the PyTorch safetensors ``files`` of ``where`` and cast to
    ``dtype``: every key and shape checked against the headers before any tensor is read."""
    import jax.numpy as jnp
    from flax.traverse_util import unflatten_dict
    from safetensors import safe_open

    expected = key_map(shapes)
    tensors = _Tensors(where, files, key)
    _check_keys(expected, tensors, name, key)
    for k, (_, want) in expected.items():
        file, code, shape = tensors.entries[k][:3]
        if shape != want:
            raise SpecError(key, f"'{file}': tensor '{k}' has shape {list(shape)}; the {name} of config.json needs {list(want)}")
        if code not in FLOAT_CODES:
            raise SpecError(key, f"'{file}': tensor '{k}' is {code}; the job holds parameters as floating point "
                                 f"({', '.join(FLOAT_CODES)})")
    target = np.dtype(jnp.dtype(dtype))
    params, handles = {}, {}
    try:
        for k, (path, _) in expected.items():
            file, code, _, *old = tensors.entries[k]
            if file not in handles:
                handles[file] = safe_open(file, framework="np").__enter__()
            a = _read(handles[file], file, old[0] if old else k, code)
            params[path] = _cast(np.ascontiguousarray(from_pytorch(path, a)), target, file, k, code, key)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return unflatten_dict(params)


def _check_keys(expected: dict, tensors: _Tensors, name: str, key: str) -> None:
    unexpected = sorted(k for k in tensors.entries if k not in expected)
    if unexpected:
        k = unexpected[0]
        others = [c for c, prefixes in CLASS_HINTS.items() if c != name and k.startswith(prefixes)]
        hint = f" (it looks like a {others[0]}'s weights)" if others and not any(
            k.startswith(p) for p in CLASS_HINTS.get(name, ())) else ""
        more = f" ({len(unexpected)} keys the model does not have)" if len(unexpected) > 1 else ""
        raise SpecError(key, f"'{tensors.file_of(k)}': tensor '{k}' is not a parameter of the {name} of config.json{hint}{more}")
    missing = sorted(k for k in expected if k not in tensors.entries)
    if missing:
        more = f" ({len(missing)} missing)" if len(missing) > 1 else ""
        raise SpecError(key, f"'{tensors.index}' has no tensor '{missing[0]}', which the {name} of config.json needs{more}")


def _cast(a: np.ndarray, target: np.dtype, file: str, k: str, code: str, key: str) -> np.ndarray:
    if not np.isfinite(a).all():
        raise SpecError(key, f"'{file}': tensor '{k}' holds non-finite values (nan or inf)")
    with np.errstate(over="ignore"):
        out = a.astype(target)
    if not np.isfinite(out).all():
        raise SpecError(key, f"'{file}': tensor '{k}' ({code}) has values up to {float(np.abs(a).max()):.3g}, beyond the range "
                             f"of {target.name} (model.dtype): they would be inf")
    return out


# ------------------------------------------------------------------------------------------------
# writing
