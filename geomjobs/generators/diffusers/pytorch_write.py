"""Writing diffusers-format PyTorch folders from Flax params, without torch: the inverse of
:mod:`.pytorch_weights`, in float32, float16, bfloat16 or float64; what a diffusers PyTorch
``save_pretrained`` writes (config keys of the PyTorch class, ``_class_name`` without the Flax
prefix, tensors in PyTorch names and layout, metadata ``{"format": "pt"}``). For tests and for
benchmarks against the PyTorch classes on the same weights."""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from geomjobs.generators.diffusers.pytorch_weights import _CODE_OF, FLAX_ONLY, PT_ONLY, PT_WEIGHTS, _plain, pytorch_key, to_pytorch


def class_name(config, params=None) -> str:
    """The PyTorch class of a config (its ``_class_name`` without ``Flax``), else guessed from the params."""
    name = str(dict(config).get("_class_name") or "").removeprefix("Flax")
    if name:
        return name
    top = set(_plain(params) or {})
    if {"encoder", "decoder"} <= top:
        return "AutoencoderKL"
    if "time_embedding" in top:
        return "UNet2DConditionModel"
    raise ValueError("the config has no _class_name and the params are neither an AutoencoderKL's nor a UNet2DConditionModel's")


def pytorch_config(config, name: str) -> dict:
    """The config.json diffusers' PyTorch class writes: every key of its __init__ (the Flax config's
    keys but the Flax-only ones, the PyTorch-only ones at their defaults), ``_class_name``,
    ``_diffusers_version``."""
    from importlib.metadata import PackageNotFoundError, version

    cfg = {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in FLAX_ONLY}
    for k, (default, _) in PT_ONLY.get(name, {}).items():
        cfg.setdefault(k, default)
    try:
        ver = version("diffusers")
    except PackageNotFoundError:
        ver = "0.39.0"
    cfg = json.loads(json.dumps(cfg, default=list))   # tuples -> lists, as JSON has them
    return {"_class_name": name, "_diffusers_version": ver, **cfg}


def write_pytorch_folder(params, config, path, dtype="float32") -> str:
    """Write Flax ``params`` (an AutoencoderKL's or a UNet2DConditionModel's full tree) and their
    ``config`` (a dict or ``module.config``) as a diffusers PyTorch model folder at ``path``:
    ``config.json`` and ``diffusion_pytorch_model.safetensors`` with the tensors in PyTorch names
    and layout, in ``dtype`` (float32, float16, bfloat16, float64; rounding to nearest even).
    Returns the weights file's path."""
    import jax.numpy as jnp
    from flax.traverse_util import flatten_dict

    name = class_name(config, params)
    target = np.dtype(jnp.dtype(dtype))
    if target.name not in _CODE_OF:
        raise ValueError(f"dtype must be one of {sorted(_CODE_OF)}, got {dtype!r}")
    tensors = {}
    for p, a in flatten_dict(_plain(params)).items():
        k = pytorch_key(p)
        if k in tensors:
            raise ValueError(f"two Flax params map to PyTorch key {k!r}")
        tensors[k] = np.ascontiguousarray(to_pytorch(p, np.asarray(a)).astype(target))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(pytorch_config(config, name), f, indent=2, sort_keys=True)
        f.write("\n")
    out = os.path.join(path, PT_WEIGHTS)
    try:
        from safetensors.numpy import save_file
        save_file(tensors, out, metadata={"format": "pt"})
    except Exception:  # noqa: BLE001 - a safetensors without NumPy bf16: write the format by hand
        write_safetensors_raw(tensors, out, metadata={"format": "pt"})
    return out


def write_safetensors_raw(tensors: dict[str, np.ndarray], path: str, metadata: dict | None = None) -> None:
    """The safetensors format by hand (8-byte little-endian header length, JSON header, data in
    key order, little-endian), for dtypes the installed safetensors' NumPy API cannot write."""
    head, blobs, offset = {}, [], 0
    for k in sorted(tensors):
        a = np.ascontiguousarray(tensors[k])
        code = _CODE_OF[a.dtype.name]
        data = a.astype(a.dtype.newbyteorder("<")).tobytes() if a.dtype.name != "bfloat16" else a.view("<u2").tobytes()
        head[k] = {"dtype": code, "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if metadata:
        head["__metadata__"] = dict(metadata)
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
