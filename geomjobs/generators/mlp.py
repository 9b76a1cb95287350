"""``kind: mlp``: a multilayer perceptron from an .npz of arrays W0, b0, W1, b1, ...

z is a row vector; h <- act(h @ Wi + bi) for every layer but the last, which is affine.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.errors import SpecError
from geomjobs.generators.base import Generator

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def load_mlp_weights(path: str, *, key: str = "model.weights") -> list[tuple[np.ndarray, np.ndarray]]:
    """Read and check W0, b0, ... from an .npz; any problem names the file and what was expected."""
    from geomjobs.sink.fs import open_input

    try:
        with open_input(path) as f:
            data = dict(np.load(f, allow_pickle=False))
    except FileNotFoundError:
        raise SpecError(key, f"weight file '{path}' does not exist") from None
    except Exception as e:  # zip errors, pickles, truncated files
        raise SpecError(key, f"weight file '{path}' is not a readable .npz ({type(e).__name__}: {e})") from None
    names = set(data)
    layers = sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"W(\d+)", n)))
    if not layers:
        raise SpecError(key, f"weight file '{path}' has no arrays W0, b0, W1, b1, ...; found {sorted(names)}")
    if layers != list(range(len(layers))):
        raise SpecError(key, f"weight file '{path}': layers must be numbered W0..W{len(layers) - 1} without gaps, found {layers}")
    out = []
    for i in layers:
        w = data[f"W{i}"]
        b = data.get(f"b{i}")
        if b is None:
            raise SpecError(key, f"weight file '{path}': W{i} has no bias b{i}")
        if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[1]:
            raise SpecError(key, f"weight file '{path}': expected W{i} of shape (in, out) and b{i} of shape (out,), "
                                 f"got {w.shape} and {b.shape}")
        if out and out[-1][0].shape[1] != w.shape[0]:
            raise SpecError(key, f"weight file '{path}': W{i} takes {w.shape[0]} inputs but layer {i - 1} gives {out[-1][0].shape[1]}")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise SpecError(key, f"weight file '{path}': W{i}/b{i} contain non-finite values")
        out.append((w, b))
    extra = names - {f"W{i}" for i in layers} - {f"b{i}" for i in layers}
    if extra:
        raise SpecError(key, f"weight file '{path}': unexpected arrays {sorted(extra)} (expected only W0, b0, W1, b1, ...)")
    return out


def mlp_apply(layers, z, activation="relu", negative_slope=0.01):
    act = ACTIVATIONS[activation]
    if activation == "leaky_relu":
        act = lambda x: jax.nn.leaky_relu(x, negative_slope)  # noqa: E731
    h = z
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = act(h)
    return h


def mlp_generator(model: dict, dtype=jnp.float32) -> Generator:
    layers_np = load_mlp_weights(model["weights"])
    activation = model.get("activation", "relu")
    slope = float(model.get("negative_slope", 0.01))
    params = [(jnp.asarray(w, dtype), jnp.asarray(b, dtype)) for w, b in layers_np]

    def apply(p, z):
        return mlp_apply(p, z, activation, slope)

    name = Path(model["weights"]).stem
    return Generator(model_id=f"mlp:{name}", apply=apply, params=params,
                     latent_shape=(layers_np[0][0].shape[0],), output_shape=(layers_np[-1][0].shape[1],), dtype=dtype)


def save_mlp(path, layers) -> None:
    """Write [(W, b), ...] in the .npz layout ``kind: mlp`` reads."""
    np.savez(path, **{f"{n}{i}": a for i, (w, b) in enumerate(layers) for n, a in (("W", w), ("b", b))})


def random_mlp(sizes, seed=0, scale=1.0):
    """He-initialised random layers for tests and benchmarks: sizes = [d, h1, ..., n]."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((a, b)) * scale * np.sqrt(2.0 / a), rng.standard_normal(b) * 0.1)
            for a, b in zip(sizes[:-1], sizes[1:])]
