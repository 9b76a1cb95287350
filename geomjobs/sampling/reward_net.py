"""The reward model r(z_t, t) and its folder format (docs/reward.md).

Network (:class:`RewardNet`, flax linen). The timestep t is in the diffusion model's own units
(0..T-1, integer or float) and enters through a sinusoidal embedding
``[cos(t f), sin(t f)], f_i = 10000^(-i / (temb / 2))`` followed by a two-layer SiLU MLP. The latent
is first normalised by two scalars stored with the model, ``(z - z_mean) / z_std``. Then, picked by
the rank of the latent shape:

- ``mlp`` (flat latents, rank 1): ``h = silu(W z + U e)`` and ``depth - 1`` more layers
  ``h = silu(W h + U e)`` (the embedding e is added at every layer), then an affine read-out;
- ``conv`` (image-shaped latents, rank 2 or 3; rank 2 is read as one channel): 3x3 convolutions
  with the embedding added per channel, halving the resolution ``depth - 1`` times while it stays
  above 2 and doubling the channels, a global mean pool, then a SiLU layer and the read-out.
  The channel axis is ``layout`` ("HWC" or "CHW"; diffusers' latents are channel-first).

The network predicts the normalised target ``(y - y_mean) / y_std``; :meth:`Reward.apply` returns
``y_mean + y_std * net(z, t)``, float32, shape (B,). It is pure, jit-able and differentiable in
z_t (guidance takes ``jax.grad`` of ``sum(r)``).

Folder (local or gs://)::

    reward.json        format, network config, normalisation, latent shape, num_train_timesteps,
                       t_range (smallest, largest t seen in training), target, and whatever the
                       trainer adds (datasets, training config, metrics)
    params.msgpack     flax.serialization.to_bytes of the parameters
    checkpoints/       the trainer's resumable state (:mod:`geomjobs.reward.train`)
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from geomjobs.errors import SpecError
from geomjobs.sink.fs import filesystem, join, normalize_uri

FORMAT = "geomjobs-reward/1"
DEFAULT_NETWORK = {"hidden": 128, "depth": 3, "temb": 64, "channels": 32}


def timestep_embedding(t, dim: int, max_period: float = 10000.0) -> jax.Array:
    """(..., dim) float32: [cos(t f), sin(t f)], f_i = max_period^(-i / (dim / 2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class RewardNet(nn.Module):
    """r(z, t) on normalised z, predicting the normalised target; z: (B, *latent_shape), t: (B,)."""
    kind: str                      # "mlp" | "conv"
    latent_shape: tuple
    hidden: int = 128
    depth: int = 3
    temb: int = 64
    channels: int = 32
    layout: str = "HWC"            # conv only: where the channel axis is (rank-3 latents)

    @nn.compact
    def __call__(self, z, t):
        e = timestep_embedding(t, self.temb)
        e = nn.Dense(self.hidden, name="temb_0")(e)
        e = nn.Dense(self.hidden, name="temb_1")(nn.silu(e))
        b = z.shape[0]
        if self.kind == "mlp":
            h = z.reshape(b, -1)
            for i in range(self.depth):
                h = nn.silu(nn.Dense(self.hidden, name=f"dense_{i}")(h) + nn.Dense(self.hidden, use_bias=False, name=f"film_{i}")(e))
            return nn.Dense(1, name="out")(h)[:, 0]
        if self.kind != "conv":
            raise ValueError(f"unknown reward network kind {self.kind!r}; expected 'mlp' or 'conv'")
        x = z.reshape(b, *self.latent_shape)
        if x.ndim == 3:
            x = x[..., None]
        elif self.layout == "CHW":
            x = jnp.moveaxis(x, 1, -1)
        ch = self.channels
        x = nn.Conv(ch, (3, 3), name="conv_in")(x)
        for i in range(self.depth):
            stride = 2 if i > 0 and min(x.shape[1:3]) > 2 else 1
            if stride == 2:
                ch *= 2
            x = nn.Conv(ch, (3, 3), strides=(stride, stride), name=f"conv_{i}")(nn.silu(x))
            x = x + nn.Dense(ch, use_bias=False, name=f"film_{i}")(e)[:, None, None, :]
        h = jnp.mean(nn.silu(x), axis=(1, 2))
        h = nn.silu(nn.Dense(self.hidden, name="head")(h) + nn.Dense(self.hidden, use_bias=False, name="film_head")(e))
        return nn.Dense(1, name="out")(h)[:, 0]


def default_layout(latent_shape) -> str:
    """Channel axis of a rank-3 latent shape when not given: geomjobs' image-shaped latents are
    diffusers' [C, h, w], so first, unless the last axis is the smaller end axis ([h, w, C])."""
    s = tuple(latent_shape)
    return "HWC" if len(s) == 3 and s[-1] < s[0] else "CHW"


def network_config(latent_shape, **overrides) -> dict:
    """The ``network`` entry of reward.json for a latent shape: kind by rank, sizes, layout."""
    shape = tuple(int(x) for x in latent_shape)
    kind = "mlp" if len(shape) == 1 else "conv"
    cfg = {"kind": kind, **DEFAULT_NETWORK, **{k: v for k, v in overrides.items() if v is not None}}
    if kind == "conv":
        cfg.setdefault("layout", default_layout(shape))
    else:
        cfg.pop("layout", None)
    return cfg


def build_network(latent_shape, config: dict) -> RewardNet:
    keys = ("kind", "hidden", "depth", "temb", "channels", "layout")
    return RewardNet(latent_shape=tuple(int(x) for x in latent_shape), **{k: config[k] for k in keys if k in config})


def init_params(net: RewardNet, seed: int = 0):
    """Initial parameters, in one compiled program (eager initialisation compiles every op)."""
    return jax.jit(lambda: _init(net, seed))()


def _init(net: RewardNet, seed: int):
    z = jnp.zeros((1, *net.latent_shape), jnp.float32)
    return net.init(jax.random.PRNGKey(seed), z, jnp.zeros((1,), jnp.float32))["params"]


def normalised_apply(net: RewardNet, norm: dict) -> Callable:
    """``f(params, z_t, t) -> (B,) float32``: the network on normalised inputs, de-normalised output."""
    zm, zs = float(norm["z_mean"]), float(norm["z_std"])
    ym, ys = float(norm["y_mean"]), float(norm["y_std"])

    def apply(params, z_t, t):
        z = (jnp.asarray(z_t, jnp.float32) - zm) / zs
        y = net.apply({"params": params}, z, jnp.asarray(t, jnp.float32))
        return (ym + ys * y).astype(jnp.float32)

    return apply


@dataclasses.dataclass(frozen=True)
class Reward:
    """A loaded reward folder. ``apply(params, z_t, t)`` for z_t (B, *latent_shape), t (B,) in the
    diffusion model's timestep units gives (B,) float32 predictions of ``target``."""
    latent_shape: tuple[int, ...]
    num_train_timesteps: int
    t_range: tuple[float, float]
    target: str
    meta: dict
    params: Any
    network: RewardNet = dataclasses.field(repr=False)

    @property
    def normalisation(self) -> dict:
        return self.meta["normalisation"]

    def apply(self, params, z_t, t):
        return normalised_apply(self.network, self.normalisation)(params, z_t, t)

    def fn(self) -> Callable:
        """``lambda z, t: r(z, t)`` with this folder's parameters bound."""
        f, params = normalised_apply(self.network, self.normalisation), self.params
        return lambda z, t: f(params, z, t)


def reward_meta(latent_shape, num_train_timesteps: int, t_range, target: str, network: dict, normalisation: dict, **extra) -> dict:
    """The fields reward.json must have (what :func:`load_reward` reads), plus ``extra``."""
    return {"format": FORMAT, "latent_shape": [int(x) for x in latent_shape], "num_train_timesteps": int(num_train_timesteps),
            "t_range": [float(t_range[0]), float(t_range[1])], "target": str(target), "network": dict(network),
            "normalisation": {k: float(v) for k, v in normalisation.items()}, **extra}


REQUIRED = ("format", "latent_shape", "num_train_timesteps", "t_range", "target", "network", "normalisation")


def save_reward(uri: str, params, meta: dict) -> str:
    """Write ``params.msgpack`` then ``reward.json`` under ``uri`` (so a folder with a reward.json
    is complete). ``meta`` must hold the fields of :func:`reward_meta`. Returns the normalised URI."""
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"reward meta lacks {missing}; build it with reward_meta()")
    uri = normalize_uri(uri)
    fs, root = filesystem(uri)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(join(root, "params.msgpack"), serialization.to_bytes(jax.device_get(params)))
    fs.pipe_file(join(root, "reward.json"), json.dumps(meta, indent=2, default=_json_default).encode())
    return uri


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_reward(uri: str, key: str = "reward") -> Reward:
    """The reward folder at ``uri``; SpecError(key) naming the folder when it does not exist or
    is not a reward folder (no reward.json / params.msgpack, or a reward.json it cannot read)."""
    uri = normalize_uri(str(uri))
    fs, root = filesystem(uri)
    if not fs.exists(root):
        raise SpecError(key, f"reward folder '{uri}' does not exist")
    for name in ("reward.json", "params.msgpack"):
        if not fs.exists(join(root, name)):
            raise SpecError(key, f"'{uri}' is not a reward folder: it has no {name} (write one with 'geomjobs reward train')")
    try:
        meta = json.loads(fs.cat_file(join(root, "reward.json")))
    except ValueError as e:
        raise SpecError(key, f"'{uri}/reward.json' is not valid JSON: {e}") from None
    missing = [k for k in REQUIRED if k not in meta] if isinstance(meta, dict) else list(REQUIRED)
    if missing:
        raise SpecError(key, f"'{uri}/reward.json' is not a reward model's: it lacks {missing}")
    if meta["format"] != FORMAT:
        raise SpecError(key, f"'{uri}/reward.json' has format {meta['format']!r}; expected {FORMAT!r}")
    params = serialization.msgpack_restore(fs.cat_file(join(root, "params.msgpack")))
    shape = tuple(int(x) for x in meta["latent_shape"])
    try:
        net = build_network(shape, meta["network"])
        expected = jax.tree_util.tree_map(lambda x: tuple(x.shape), jax.eval_shape(lambda: _init(net, 0)))
    except Exception as e:   # a network config this version cannot build
        raise SpecError(key, f"'{uri}/reward.json' describes a network that cannot be built: {e}") from None
    got = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), params)
    if expected != got:
        raise SpecError(key, f"'{uri}/params.msgpack' does not match the network in reward.json")
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)
    return Reward(shape, int(meta["num_train_timesteps"]), (float(meta["t_range"][0]), float(meta["t_range"][1])),
                  str(meta["target"]), meta, params, net)
