"""diffusers' ``DiTTransformer2DModel`` (Peebles & Xie 2023: DiT-XL/2 and the rest of the family)
in Flax, with diffusers' parameter layout and config, read from a diffusers-format PyTorch folder
(``config.json`` + ``diffusion_pytorch_model.safetensors``) without torch.

**Config** (:class:`DiTConfig`): the keys of ``DiTTransformer2DModel.__init__`` (:data:`CONFIG_DEFAULTS`,
checked against the installed diffusers' source in tests/test_dit_diffusers.py). A
``Transformer2DModel`` config with ``norm_type: ada_norm_zero`` (what the DiT checkpoints published
with diffusers 0.12 say) is read as diffusers remaps it (``_CLASS_REMAPPING_DICT``). What the
model computes differently or not at all is refused by :meth:`DiTConfig.from_json`, naming
``config.json`` and the key: another ``norm_type``, an ``activation_fn`` other than
``gelu-approximate`` / ``gelu``, ``norm_elementwise_affine: true``, ``out_channels`` other than
``in_channels`` or 2 x ``in_channels`` (learned sigma), ``sample_size`` not a multiple of
``patch_size``. Not read: ``dropout`` (inference), ``norm_num_groups`` (the DiT class passes it
nowhere), ``upcast_attention`` (half-precision attention scores only).

**The forward pass** (:class:`DiTTransformer2D`), for latents x (B, C, S, S) channels-first,
integer timesteps t (B,) and class labels y (B,) (label ``num_classes`` = the null class that
classifier-free guidance uses; D = heads x head_dim, p = patch_size, N = (S / p)^2 tokens)::

    tokens  Conv(p x p, stride p)(x) -> (B, N, D), row-major over the (S/p, S/p) patch grid,
            + the fixed 2-D sin-cos table (first D/2 channels: the patch's column, last D/2: its
            row; diffusers' / MAE's order), held as float32 as diffusers holds it
    c_i     block i's own embedders (diffusers keeps a copy in every block; the converted DiT
            checkpoints hold equal copies): c_i = linear_2(SiLU(linear_1(e(t)))) + table_i[y],
            e(t) = [cos(t f_k), sin(t f_k)], f_k = 10000^(-k / 127), k < 128 (diffusers'
            ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)``, computed in float32;
            the original DiT code divides by 128: at t = 0 both are [1 .. 1, 0 .. 0])
    block i (shift1, scale1, gate1, shift2, scale2, gate2) = linear(SiLU(c_i))      (adaLN-Zero)
            x += gate1 * Attn(LN(x; 1e-6) * (1 + scale1) + shift1)     (H heads, softmax(q k^T / sqrt(hd)) v)
            x += gate2 * MLP(LN(x; norm_eps) * (1 + scale2) + shift2)  (Linear(4D) -> GELU -> Linear(D))
    final   (shift, scale) = proj_out_1(SiLU(c_0)); LN(x; 1e-6) * (1 + scale) + shift;
            proj_out_2 -> (B, N, p * p * C_out) -> unpatchify (p, p, C_out per token) -> (B, C_out, S, S)

LN has no affine parameters and is written out (mean, then the mean of squared deviations): no
clamp that the delta tracer would count. GELU is ``flax.linen.gelu`` (tanh form for
``gelu-approximate``). The blocks are a Python loop (never ``nn.scan``), so delta's tracer sees
every GELU (blocks x tokens x 4D neurons per sample and branch).

**Layout.** Every Flax parameter path maps to one PyTorch key by the rules of
:func:`geomjobs.generators.diffusers.pytorch_weights.pytorch_key` (``transformer_blocks_3`` ->
``transformer_blocks.3``, ``to_out_0`` -> ``to_out.0``, ``net_0`` -> ``net.0``, ``kernel`` /
``embedding`` -> ``weight``) and layouts (Linear (out, in) <-> Dense (in, out); Conv2d (out, in, p, p)
<-> (p, p, in, out); Embedding (n, D) as is). :func:`pytorch_shapes` is the resulting key -> shape
table, which the tests compare with the state dict of the installed diffusers' own
``DiTTransformer2DModel.__init__``.

**Reading** (:func:`load_dit_folder`): the config is checked, the safetensors header(s) compared
with :func:`pytorch_shapes` (a missing or unexpected tensor, a shape that does not fit the config,
a non-float dtype: a :class:`SpecError` naming the file and the tensor, before any tensor is read),
then each tensor is read and cast to ``model.dtype`` by the PyTorch-folder reader the diffusers
kinds use (:mod:`geomjobs.generators.diffusers.pytorch_weights`: F16 / BF16 / F32 / F64, non-finite
values refused). **Writing** (:func:`write_dit_folder`): the inverse, as ``save_pretrained`` writes it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.errors import SpecError
from geomjobs.generators.diffusers import pytorch_weights as ptw

CLASS_NAME = "DiTTransformer2DModel"
LEGACY_CLASS = "Transformer2DModel"          # remapped to DiTTransformer2DModel when norm_type is ada_norm_zero
# DiTTransformer2DModel.__init__'s arguments and defaults (diffusers 0.28 .. 0.39)
CONFIG_DEFAULTS: dict[str, Any] = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "upcast_attention": False,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5}
ACTIVATIONS = {"gelu-approximate": True, "gelu": False}      # -> flax.linen.gelu(approximate=...)
TIME_CHANNELS = 256                          # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256, ...)
TIME_FREQ_SHIFT = 1                          # ... downscale_freq_shift=1
ADA_EPS = 1e-6                               # AdaLayerNormZero's and norm_out's LayerNorm eps (fixed in diffusers)
_POSITIVE = ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers", "sample_size", "patch_size",
             "num_embeds_ada_norm")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """The model a DiT config.json describes (module doc); only what the forward pass reads."""
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int = 8
    num_layers: int = 28
    sample_size: int = 32
    patch_size: int = 2
    num_embeds_ada_norm: int = 1000
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_eps: float = 1e-5

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def num_classes(self) -> int:
        """Real classes 0..num_classes-1; label ``num_classes`` is the null class (row num_classes of the table)."""
        return self.num_embeds_ada_norm

    @property
    def grid(self) -> int:
        return self.sample_size // self.patch_size

    @property
    def learned_sigma(self) -> bool:
        """The output holds eps then the variance channels (DiT's learned sigma): eps = the first in_channels."""
        return self.out_channels == 2 * self.in_channels

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.sample_size, self.sample_size)

    @classmethod
    def from_json(cls, raw: dict, where: str = "config.json", key: str = "model.path") -> DiTConfig:
        """The config of a raw config.json (``where`` names it in errors), checked (module doc)."""
        def bad(k, why):
            return SpecError(key, f"'{where}' sets {k}: {json.dumps(raw.get(k))}; {why}")

        name = str(raw.get("_class_name") or "").removeprefix("Flax")
        if name and name != CLASS_NAME and not (name == LEGACY_CLASS and raw.get("norm_type") == "ada_norm_zero"):
            raise SpecError(key, f"'{where}' is a {name} config; expected a {CLASS_NAME} (or a {LEGACY_CLASS} with "
                                 f"norm_type ada_norm_zero, which diffusers reads as one)")
        c = {**CONFIG_DEFAULTS, **{k: v for k, v in raw.items() if k in CONFIG_DEFAULTS}}
        for k in _POSITIVE:
            if isinstance(c[k], bool) or not isinstance(c[k], int) or c[k] < 1:
                raise bad(k, "expected a positive integer")
        if c["norm_type"] != "ada_norm_zero":
            raise bad("norm_type", "a DiT is ada_norm_zero (diffusers' DiTTransformer2DModel builds nothing else)")
        if c["activation_fn"] not in ACTIVATIONS:
            raise bad("activation_fn", f"this DiT computes {' or '.join(ACTIVATIONS)} feed-forwards only")
        if c["norm_elementwise_affine"] is not False:
            raise bad("norm_elementwise_affine", "this DiT computes the feed-forward LayerNorm without affine parameters only")
        if not isinstance(c["attention_bias"], bool):
            raise bad("attention_bias", "expected true or false")
        eps = c["norm_eps"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise bad("norm_eps", "expected a positive number")
        if c["sample_size"] % c["patch_size"]:
            raise bad("sample_size", f"not a multiple of patch_size {c['patch_size']}")
        inner = c["num_attention_heads"] * c["attention_head_dim"]
        if inner % 4:
            raise bad("attention_head_dim", f"num_attention_heads x attention_head_dim = {inner} must be a multiple of 4 "
                                            "(the 2-D sin-cos positions split it in four)")
        out = c["out_channels"] if c["out_channels"] is not None else c["in_channels"]
        if isinstance(out, bool) or out not in (c["in_channels"], 2 * c["in_channels"]):
            raise bad("out_channels", f"expected in_channels ({c['in_channels']}: eps) or 2 x in_channels "
                                      f"({2 * c['in_channels']}: eps and learned sigma)")
        return cls(c["num_attention_heads"], c["attention_head_dim"], c["in_channels"], int(out), c["num_layers"],
                   c["sample_size"], c["patch_size"], c["num_embeds_ada_norm"], c["attention_bias"], c["activation_fn"],
                   float(eps))

    def to_json(self) -> dict:
        """The config.json diffusers' PyTorch ``save_pretrained`` writes for this model (every
        ``__init__`` key; those the forward pass does not read at their defaults)."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            ver = version("diffusers")
        except PackageNotFoundError:
            ver = "0.39.0"
        cfg = {**CONFIG_DEFAULTS, **dataclasses.asdict(self)}
        return {"_class_name": CLASS_NAME, "_diffusers_version": ver, **cfg}


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------

def timestep_sinusoid(t, dim: int = TIME_CHANNELS, shift: float = TIME_FREQ_SHIFT, max_period: float = 10000.0):
    """diffusers' ``get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=shift)``
    in float32: [cos(t f), sin(t f)], f_k = exp(-ln(max_period) k / (dim / 2 - shift))."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = jnp.asarray(t).astype(jnp.float32)[..., None] * jnp.exp(exponent)
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_positions(dim: int, grid: int) -> np.ndarray:
    """diffusers' ``get_2d_sincos_pos_embed(dim, grid)`` (base_size = grid, interpolation 1): (grid^2, dim)
    float32, token i * grid + j -> [sincos(dim / 2, j), sincos(dim / 2, i)], sincos(d, u) =
    [sin(u w), cos(u w)], w_k = 10000^(-k / (d / 2)); computed in float64, held as float32."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="xy")
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1).astype(np.float32)


def _norm(x, eps: float):
    """LayerNorm over the last axis without affine parameters, written out (module doc)."""
    mu = jnp.mean(x, axis=-1, keepdims=True)
    xc = x - mu
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + eps)


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


class _Table(nn.Module):
    """nn.Embedding's weight (rows, dim) under the Flax name ``embedding``."""
    rows: int
    dim: int

    @nn.compact
    def __call__(self, y):
        table = self.param("embedding", nn.initializers.normal(0.02), (self.rows, self.dim))
        return jnp.take(table, y, axis=0)


class _TimestepEmbedding(nn.Module):
    dim: int

    @nn.compact
    def __call__(self, e):
        return nn.Dense(self.dim, name="linear_2")(nn.silu(nn.Dense(self.dim, name="linear_1")(e)))


class _LabelEmbedding(nn.Module):
    num_classes: int
    dim: int

    @nn.compact
    def __call__(self, y):
        return _Table(self.num_classes + 1, self.dim, name="embedding_table")(y)   # + the null class


class _CombinedEmbedding(nn.Module):
    """CombinedTimestepLabelEmbeddings: c = TimestepEmbedding(e(t)) + table[y]."""
    config: DiTConfig

    @nn.compact
    def __call__(self, e, y):
        cfg = self.config
        return _TimestepEmbedding(cfg.inner_dim, name="timestep_embedder")(e) + \
            _LabelEmbedding(cfg.num_classes, cfg.inner_dim, name="class_embedder")(y)


class _AdaLayerNormZero(nn.Module):
    config: DiTConfig

    @nn.compact
    def __call__(self, x, e, y):
        c = _CombinedEmbedding(self.config, name="emb")(e, y)
        mod = nn.Dense(6 * self.config.inner_dim, name="linear")(nn.silu(c))
        shift, scale, gate, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)
        return _modulate(_norm(x, ADA_EPS), shift, scale), gate, shift2, scale2, gate2, c


class _Attention(nn.Module):
    heads: int
    head_dim: int
    bias: bool

    @nn.compact
    def __call__(self, x):
        D, hd = self.heads * self.head_dim, self.head_dim
        q, k, v = (nn.Dense(D, use_bias=self.bias, name=n)(x).reshape(*x.shape[:-1], self.heads, hd)
                   for n in ("to_q", "to_k", "to_v"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        wide = jnp.promote_types(logits.dtype, jnp.float32)     # the softmax in at least float32
        att = jax.nn.softmax(logits.astype(wide), axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(*x.shape[:-1], D)
        return nn.Dense(D, name="to_out_0")(out)


class _GELU(nn.Module):
    """diffusers' activations.GELU: Linear ``proj`` then GELU."""
    features: int
    approximate: bool

    @nn.compact
    def __call__(self, x):
        return nn.gelu(nn.Dense(self.features, name="proj")(x), approximate=self.approximate)


class _FeedForward(nn.Module):
    dim: int
    approximate: bool

    @nn.compact
    def __call__(self, x):
        h = _GELU(4 * self.dim, self.approximate, name="net_0")(x)
        return nn.Dense(self.dim, name="net_2")(h)


class _Block(nn.Module):
    """BasicTransformerBlock with norm_type ada_norm_zero (module doc); returns (x, c_i)."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x, e, y):
        cfg = self.config
        h, gate, shift2, scale2, gate2, c = _AdaLayerNormZero(cfg, name="norm1")(x, e, y)
        x = x + gate[:, None] * _Attention(cfg.num_attention_heads, cfg.attention_head_dim, cfg.attention_bias, name="attn1")(h)
        h = _modulate(_norm(x, cfg.norm_eps), shift2, scale2)
        x = x + gate2[:, None] * _FeedForward(cfg.inner_dim, ACTIVATIONS[cfg.activation_fn], name="ff")(h)
        return x, c


class _PatchEmbed(nn.Module):
    config: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        p = cfg.patch_size
        h = nn.Conv(cfg.inner_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(jnp.transpose(x, (0, 2, 3, 1)))
        h = h.reshape(h.shape[0], -1, cfg.inner_dim)             # (B, N, D), row-major over the patch grid
        if h.shape[1] != cfg.grid ** 2:
            raise ValueError(f"the DiT takes latents {list(cfg.latent_shape)}, got {list(x.shape[1:])}")
        pos = jnp.asarray(sincos_positions(cfg.inner_dim, cfg.grid))
        return (h + pos.astype(jnp.promote_types(h.dtype, jnp.float32))).astype(h.dtype)


class DiTTransformer2D(nn.Module):
    """eps (and learned sigma) of diffusers' DiTTransformer2DModel for x (B, C, S, S), t (B,) and y (B,):
    (B, out_channels, S, S) in x's dtype (module doc). Params: the Flax tree of :func:`param_shapes`."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x, t, y):
        cfg = self.config
        h = _PatchEmbed(cfg, name="pos_embed")(x)
        e = timestep_sinusoid(jnp.broadcast_to(t, x.shape[:1])).astype(h.dtype)
        y = jnp.broadcast_to(jnp.asarray(y, jnp.int32), x.shape[:1])
        c0 = None
        for i in range(cfg.num_layers):                 # a Python loop, never nn.scan (module doc)
            h, c = _Block(cfg, name=f"transformer_blocks_{i}")(h, e, y)
            c0 = c if c0 is None else c0                # the final layer uses block 0's embedders
        shift, scale = jnp.split(nn.Dense(2 * cfg.inner_dim, name="proj_out_1")(nn.silu(c0)), 2, axis=-1)
        h = _modulate(_norm(h, ADA_EPS), shift, scale)
        h = nn.Dense(cfg.patch_size ** 2 * cfg.out_channels, name="proj_out_2")(h)
        return unpatchify(h, cfg)


def unpatchify(h, cfg: DiTConfig):
    """(B, N, p * p * C) -> (B, C, S, S): token (i, j)'s (a, b, c) entry is pixel (c, i p + a, j p + b)."""
    g, p, c = cfg.grid, cfg.patch_size, cfg.out_channels
    h = h.reshape(h.shape[0], g, g, p, p, c)
    return jnp.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, g * p, g * p)


def param_shapes(cfg: DiTConfig, dtype=jnp.float32):
    """The Flax param tree of ``cfg`` as ShapeDtypeStructs (no FLOPs, nothing allocated)."""
    module = DiTTransformer2D(cfg)
    x = jax.ShapeDtypeStruct((1, *cfg.latent_shape), dtype)
    s = jax.eval_shape(lambda x: module.init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)), x)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, dtype), s["params"])


def pytorch_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """{PyTorch key: PyTorch shape} of every parameter of ``cfg`` (module doc: Layout)."""
    return {k: shape for k, (_, shape) in ptw.key_map(param_shapes(cfg)).items()}


def random_dit_params(cfg: DiTConfig, seed: int = 0, spread: float = 0.1):
    """Random float32 params (kernels N(0, 1/fan_in), the rest N(0, spread^2); the class table
    N(0, 1)): every unit generic (diffusers' init zeroes adaLN-Zero's modulations and the output)."""
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return ((1.0 if name == "embedding" else spread) * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(cfg))


# ------------------------------------------------------------------------------------------------
# reading and writing diffusers folders
# ------------------------------------------------------------------------------------------------

def read_config(where: str, key: str = "model.path") -> tuple[DiTConfig, dict]:
    """(config, raw config.json) of the model folder ``where``."""
    path = os.path.join(where, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise SpecError(key, f"cannot read '{path}': {type(e).__name__}: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(key, f"'{path}' is not a JSON object")
    return DiTConfig.from_json(raw, path, key), raw


def weight_files(where: str, key: str = "model.path") -> list[str]:
    """The safetensors file(s) of a DiT folder (diffusers has no Flax DiT: Flax weights are not read)."""
    found = os.listdir(where)
    kind, files = ptw.choose_weights([n for n in found if n != ptw.FLAX_WEIGHTS])
    if kind != "safetensors":
        if kind == "none" and ptw.FLAX_WEIGHTS in found:
            raise SpecError(key, f"'{where}' has only Flax weights ({ptw.FLAX_WEIGHTS}); diffusers has no Flax DiT, so a DiT "
                                 f"folder holds {ptw.PT_WEIGHTS} (diffusers' PyTorch format)")
        raise ptw.weights_error(kind, files, where, key, found)
    return files


def load_dit_folder(where: str, dtype=jnp.float32, key: str = "model.path") -> tuple[DiTConfig, DiTTransformer2D, Any]:
    """(config, module, params in ``dtype``) of the diffusers DiT folder ``where`` (module doc)."""
    cfg, _ = read_config(where, key)
    params = ptw.read_params(where, weight_files(where, key), param_shapes(cfg), CLASS_NAME, dtype, key)
    return cfg, DiTTransformer2D(cfg), params


def write_dit_folder(params, cfg: DiTConfig, path, dtype="float32") -> str:
    """Write Flax ``params`` of ``cfg`` as the diffusers PyTorch folder ``save_pretrained`` writes
    (config.json, diffusion_pytorch_model.safetensors in PyTorch names and layouts, in ``dtype``).
    Returns the weights file's path."""
    from geomjobs.generators.diffusers import write_pytorch_folder

    return write_pytorch_folder(params, cfg.to_json(), path, dtype)


__all__ = ["CONFIG_DEFAULTS", "DiTConfig", "DiTTransformer2D", "load_dit_folder", "param_shapes", "pytorch_shapes",
           "random_dit_params", "read_config", "sincos_positions", "timestep_sinusoid", "write_dit_folder"]
