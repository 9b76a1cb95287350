"""``dit-digits``: a Diffusion Transformer (Peebles & Xie 2023) at toy size, in pixel space on
scikit-learn's 8x8 digits; the paper analyses DiT-XL at t = 0, this is the same architecture.

Model (:class:`DiT`, flax linen), for x_t of shape (..., 8, 8) (any leading batch axes; one
channel, no channel axis) and an integer timestep t broadcast against the leading axes:

    patchify     (8, 8) -> 16 tokens of 2x2 pixels -> Dense(D)  + fixed 2-D sin-cos positions
    timestep     c = Dense(D) -> SiLU -> Dense(D) of a 256-d sinusoidal embedding of t
    blocks x L   adaLN-Zero: (shift, scale, gate) x 2 = Dense(6D, zero-init)(SiLU(c));
                 x += gate_1 * Attn(LN(x) * (1 + scale_1) + shift_1)      (H heads, softmax)
                 x += gate_2 * MLP(LN(x) * (1 + scale_2) + shift_2)       (Dense(rD) -> GELU -> Dense(D))
    final        LN(x) * (1 + scale) + shift, (shift, scale) = Dense(2D, zero-init)(SiLU(c));
                 Dense(2*2, zero-init) per token -> unpatchify -> eps_theta(x_t, t), shape (..., 8, 8)

LN has no affine parameters (eps 1e-6, written out: :func:`_norm`); GELU is flax's default (``approximate=True``, tanh form).
The blocks are a Python loop, not ``nn.scan``: geomjobs' delta tracer does not look inside
``scan``, and with the loop it finds every GELU site (blocks x tokens x rD neurons).

Data scale and schedule: pixels x / 16 * 2 - 1 in [-1, 1]; the schedule is the card's ``schedule``
(``kind`` and ``T``, and ``beta_start`` / ``beta_end`` where the kind uses them; :mod:`geomjobs.diffusion`):
cosine, T = 1000 for the shipped weights; eps-prediction. The latent shape is (8, 8): one image without a
channel axis, as :func:`geomjobs.zoo.digits.digits_images` holds them.

Public API:
    load_dit(name_or_path) -> (module, params, meta);   save_dit(stem, module, params, meta)
    dit_generator(name, timestep=0, prediction="x0") -> Generator (x_t (8, 8) -> x0_hat or eps (8, 8)),
        with ``denoiser`` = eps_theta(params, x_t, t) for samplers and per-record timesteps.
Training: ``python -m geomjobs.zoo.train_dit_digits``.

DiT-XL/2 and the other DiTs published in diffusers' layout are ``kind: dit``
(:mod:`geomjobs.generators.dit_layout`, :mod:`geomjobs.generators.dit_folder`). dit-digits keeps this
module and its weights: its conventions are the original DiT code's, not diffusers' (timestep
frequencies 10000^(-k/128), positions with the row half first, one timestep MLP shared by the
blocks, no class embedding, fused q/k/v, a Dense patch embedding, no channel axis), and its
records, delta site labels (``DiT/block_0/tanh#2``, which specs select with ``layers``) and card
stay as they are. tests/test_dit_diffusers.py maps these weights into the diffusers layout and gets
the same x0 at t = 0 through the ``dit`` module.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Generator
from geomjobs.generators.checkpoint import save_pair
from geomjobs.generators.diffusion_zoo import denoiser_generator, load_flax_pair

ZOO_FILES = {"dit-digits": "dit_digits"}
ARCH_KEYS = ("image_size", "patch", "dim", "depth", "heads", "mlp_ratio", "freq_dim")
# the schedule keys a card must hold; beta_start / beta_end only enter linear schedules (missing:
# geomjobs.diffusion.DEFAULT_SCHEDULE's) and a cosine card leaves them out
SCHEDULE_KEYS = ("kind", "T")
_WHAT, _SCRIPT = "DiT", "geomjobs.zoo.train_dit_digits"


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------

def timestep_frequencies(t, dim: int, max_period: float = 10000.0) -> jax.Array:
    """DiT's sinusoidal timestep embedding: [cos(t f), sin(t f)], f_i = max_period^(-i / (dim / 2))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_positions_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (grid*grid, dim), as in MAE / DiT (half for each axis)."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gh, gw = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(dim // 2, gh), one_axis(dim // 2, gw)], axis=1).astype(np.float32)


def _modulate(x, shift, scale):
    return x * (1.0 + scale[..., None, :]) + shift[..., None, :]


def _norm(x, eps: float = 1e-6):
    """LayerNorm over the last axis without affine parameters. Written out rather than
    ``nn.LayerNorm``, whose variance clamp ``max(0, E[x^2] - E[x]^2)`` would be a nonlinearity site
    for delta; here var = E[(x - mean)^2] needs none."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)


_zeros = nn.initializers.zeros


class Attention(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        hd = self.dim // self.heads
        qkv = nn.Dense(3 * self.dim, name="qkv")(x)
        q, k, v = (a.reshape(*a.shape[:-1], self.heads, hd) for a in jnp.split(qkv, 3, axis=-1))
        att = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(hd), axis=-1)
        out = jnp.einsum("...hqk,...khd->...qhd", att, v).reshape(*x.shape[:-1], self.dim)
        return nn.Dense(self.dim, name="proj")(out)


class DiTBlock(nn.Module):
    dim: int
    heads: int
    mlp_ratio: int

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(6 * self.dim, kernel_init=_zeros, bias_init=_zeros, name="adaLN")(nn.silu(c))
        sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
        x = x + g1[..., None, :] * Attention(self.dim, self.heads, name="attn")(_modulate(_norm(x), sh1, sc1))
        h = _modulate(_norm(x), sh2, sc2)
        h = nn.Dense(self.mlp_ratio * self.dim, name="fc1")(h)
        h = nn.gelu(h)                                   # approximate=True (flax's default)
        h = nn.Dense(self.dim, name="fc2")(h)
        return x + g2[..., None, :] * h


class DiT(nn.Module):
    """eps_theta(x_t, t) for x_t (..., image_size, image_size); see the module doc."""
    image_size: int = 8
    patch: int = 2
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 4
    freq_dim: int = 256

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    def patchify(self, x):
        g, p = self.grid, self.patch
        lead = x.shape[:-2]
        x = x.reshape(*lead, g, p, g, p)
        x = jnp.moveaxis(x, -3, -2)                      # (..., g, g, p, p)
        return x.reshape(*lead, g * g, p * p)

    def unpatchify(self, tok):
        g, p = self.grid, self.patch
        lead = tok.shape[:-2]
        x = tok.reshape(*lead, g, g, p, p)
        x = jnp.moveaxis(x, -2, -3)                      # (..., g, p, g, p)
        return x.reshape(*lead, g * p, g * p)

    @nn.compact
    def __call__(self, x, t):
        x = jnp.asarray(x, jnp.float32)
        t = jnp.broadcast_to(jnp.asarray(t), x.shape[:-2])
        tok = nn.Dense(self.dim, name="patch_embed")(self.patchify(x)) + jnp.asarray(sincos_positions_2d(self.dim, self.grid))
        c = nn.Dense(self.dim, name="t_embed_1")(timestep_frequencies(t, self.freq_dim))
        c = nn.Dense(self.dim, name="t_embed_2")(nn.silu(c))
        for i in range(self.depth):                      # a Python loop, never nn.scan (module doc)
            tok = DiTBlock(self.dim, self.heads, self.mlp_ratio, name=f"block_{i}")(tok, c)
        shift, scale = jnp.split(nn.Dense(2 * self.dim, kernel_init=_zeros, bias_init=_zeros, name="final_adaLN")(nn.silu(c)), 2, axis=-1)
        tok = _modulate(_norm(tok), shift, scale)
        tok = nn.Dense(self.patch * self.patch, kernel_init=_zeros, bias_init=_zeros, name="final")(tok)
        return self.unpatchify(tok)


def module_from_config(arch: dict) -> DiT:
    return DiT(**{k: int(arch[k]) for k in ARCH_KEYS})


def module_config(module: DiT) -> dict:
    return {"name": "DiT", "conditioning": "adaLN-Zero", "activation": "gelu (tanh approximation), silu in the conditioning",
            "positions": "fixed 2-D sin-cos", **{k: getattr(module, k) for k in ARCH_KEYS},
            "tokens": module.grid ** 2, "mlp_hidden": module.mlp_ratio * module.dim}


def init_params(module: DiT, key) -> Any:
    return module.init(key, jnp.zeros((module.image_size, module.image_size), jnp.float32), jnp.zeros((), jnp.int32))


# --------------------------------------------------------------------------------------------
# loading and saving
# --------------------------------------------------------------------------------------------

def load_dit(path_or_name="dit-digits") -> tuple[DiT, Any, dict]:
    """(module, params, meta) for a zoo name or a path to a .npz/.json pair (or their stem)."""
    return load_flax_pair(path_or_name, ZOO_FILES, {"architecture": ARCH_KEYS, "schedule": SCHEDULE_KEYS},
                          module_from_config, init_params, what=_WHAT, script=_SCRIPT)


def save_dit(stem, module: DiT, params, meta: dict) -> tuple[Path, Path]:
    return save_pair(stem, params, {**meta, "architecture": module_config(module)})


# --------------------------------------------------------------------------------------------
# the generator: the denoiser at a fixed timestep (geomjobs.generators.diffusion_zoo)
# --------------------------------------------------------------------------------------------

def dit_generator(name="dit-digits", timestep: int = 0, prediction: str = "x0") -> Generator:
    """The DiT at a fixed timestep: x_t (8, 8) -> x0_hat (default, the paper's t = 0 analysis) or eps."""
    module, params, meta = load_dit(name)

    def eps_fn(p, x, t):
        return module.apply(p, x, t)

    model_id = str(name) if str(name) in ZOO_FILES else f"dit:{Path(str(name)).with_suffix('').name}"
    shape = (module.image_size, module.image_size)
    return denoiser_generator(model_id, eps_fn, params, diffusion.abar(meta["schedule"]), shape, timestep, prediction)
