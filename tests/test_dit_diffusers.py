"""``kind: dit``: diffusers' DiTTransformer2DModel (DiT-XL/2 and its family) from diffusers-format
PyTorch folders, without torch and without a download (geomjobs/generators/dit_layout.py,
dit_folder.py). Tiny random-weight configs (depth 2, hidden 32, 2 heads, 4 x 8 x 8 latents).

What each check rests on:

- **the key set, shapes and constants diffusers declares** (test_key_set_and_shapes_are_diffusers_own):
  the installed diffusers' own ``DiTTransformer2DModel.__init__`` is run, with the constructors it
  calls (PatchEmbed, BasicTransformerBlock, AdaLayerNormZero, CombinedTimestepLabelEmbeddings,
  Attention, FeedForward, GELU, ...) taken from its source files by ``ast`` and executed against
  a recording stand-in for ``torch.nn`` (:func:`diffusers_model`; torch is not installed). The
  stand-in's Linear / Conv2d / LayerNorm / Embedding hold PyTorch's documented parameter shapes
  ((out, in), (out, in, kh, kw), (n,), (num, dim)); everything else (which modules exist, their
  names, list indices, bias flags, the null-class row, LayerNorm eps values, the timestep
  projection's channels / flip / shift, the GELU's approximation, the attention scale, which
  buffers persist) is diffusers' own code. Our key -> shape table and constants must equal it.
  The config keys and defaults are the ``__init__`` signature, read with ``ast``.
- **the folders** the tests load are written from that state dict (keys and shapes from diffusers'
  ``__init__``, random values, ``safetensors.numpy.save_file`` with ``{"format": "pt"}``), never from
  our loader's key map, and read through the real loader (``build_generator``, ``plan_job``, ``main``).
  Our own writer (``write_dit_folder``) is checked against the same state dict and read back bit for
  bit; a memory:// pipeline (the gs:// path of fsspec) copies transformer/ and scheduler/ only.
- **the forward pass** against :func:`reference_dit`, plain NumPy in float64 written from the DiT
  paper's equations (Peebles & Xie 2023, section 3: patchify, 2-D sin-cos positions, timestep and
  class embeddings summed into c, adaLN-Zero blocks, final layer, unpatchify) reading the PyTorch
  tensors in their PyTorch layouts. Where the paper leaves a convention open the reference takes
  diffusers' (this is the function these weights have in diffusers): the sinusoid's frequencies
  10000^(-k/127) (the original DiT code: /128; both give [1..1, 0..0] at t = 0), the position
  table's halves (column, then row, as MAE / DiT code), LayerNorm eps 1e-6 / norm_eps, every
  block's own copy of the embedders with block 0's feeding the final layer (the paper's one c is
  the case of equal copies, which converted checkpoints hold), the table held in float32. At t = 0
  the comparison is tight (1e-10 in float64); at t > 0 it is 1e-4, because diffusers computes the
  timestep sinusoid in float32 (and so does the model).
- **the generator**: eps = the first half of the learned-sigma output, CFG = eps_null + s (eps_y -
  eps_null) with the null class = num_classes, x0 from abar_t of the pipeline's scheduler config,
  the Denoiser at traced t: all against the reference. Jobs: ``sampled`` (CFG) latents equal a
  DDIM-4 loop written here on the reference's eps (float32 job, 1e-4); the tiny SD-style VAE of the
  same pipeline decodes them (``diffusers-vae-decoder``); a guided trajectory job's final state is the
  same loop's (``-m slow``); cluster/jobs/dit-xl2-psi.yaml plans on the tiny pipeline.
- **dit-digits** (the shipped zoo model) is the same architecture: its trained weights mapped into
  the diffusers layout (hidden channels permuted to diffusers' position-table order, q/k/v split,
  the one timestep MLP copied into each block, a one-class zero table) give its x0 at t = 0 through
  the general module to float32 rounding.
- **bad input**: exit 2 (or the SpecError the CLI maps to it) before any work, naming the key and
  the file: class_label outside the config's classes, tensors that do not fit config.json,
  configs the model does not compute, latents of another shape, timesteps beyond the schedule.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import json
import math
import os
import types
import typing
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from geomjobs import diffusion, sampling
from geomjobs.generators import build_generator
from geomjobs.generators.dit_folder import dit_from_module
from geomjobs.generators.dit_layout import (
    ADA_EPS,
    CONFIG_DEFAULTS,
    TIME_CHANNELS,
    TIME_FREQ_SHIFT,
    DiTConfig,
    DiTTransformer2D,
    load_dit_folder,
    param_shapes,
    pytorch_shapes,
)
from geomjobs.geometry.complexity import trace_sites
from geomjobs.spec import SpecError

DIFFUSERS = Path(importlib.util.find_spec("diffusers").origin).parent
DIT_SOURCE = "models/transformers/dit_transformer_2d.py"
SOURCES = [DIT_SOURCE, "models/attention.py", "models/attention_processor.py", "models/embeddings.py",
           "models/normalization.py", "models/activations.py"]
# depth 2, hidden 32 (2 heads x 16), 4 x 8 x 8 latents, learned sigma, 10 classes (+ the null class)
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
            patch_size=2, num_embeds_ada_norm=10)
# DiT's training schedule, as its pipeline's scheduler config says it
SCHEDULER = {"_class_name": "DDIMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
             "num_train_timesteps": 1000, "clip_sample": False}


# ------------------------------------------------------------------------------------------------
# diffusers' own DiTTransformer2DModel.__init__, run against a recording stand-in for torch.nn
# ------------------------------------------------------------------------------------------------

class _Param:
    def __init__(self, *shape):
        self.shape = tuple(int(s) for s in shape)


class _Value:
    """A tensor the constructors compute as a value (a buffer's contents): never read here."""
    def __getattr__(self, name):
        return lambda *a, **k: self


class _Module:
    """torch.nn.Module as far as constructors go: attributes that are modules / parameters are
    registered in assignment order, buffers with their ``persistent`` flag."""
    def __init__(self, *args, **kwargs):
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_params", {})
        object.__setattr__(self, "_buffers", {})

    def __setattr__(self, name, value):
        self._modules.pop(name, None)
        self._params.pop(name, None)
        if isinstance(value, _Module):
            self._modules[name] = value
        elif isinstance(value, _Param):
            self._params[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        for table in ("_modules", "_params"):
            if name in object.__getattribute__(self, table):
                return object.__getattribute__(self, table)[name]
        raise AttributeError(name)

    def register_buffer(self, name, tensor, persistent=True):
        self._buffers[name] = persistent

    def state_shapes(self, prefix=""):
        """{state-dict key: shape}; persistent buffers with shape None."""
        out = {prefix + k: p.shape for k, p in self._params.items()}
        out.update({prefix + k: None for k, keep in self._buffers.items() if keep})
        for k, m in self._modules.items():
            out.update(m.state_shapes(f"{prefix}{k}."))
        return out


class _ModuleList(_Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, m):
        self._modules[str(len(self._modules))] = m

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, i):
        return list(self._modules.values())[i]


class _Linear(_Module):
    def __init__(self, in_features, out_features, bias=True, *a, **k):
        super().__init__()
        self.weight = _Param(out_features, in_features)
        if bias:
            self.bias = _Param(out_features)


class _Conv2d(_Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True, *a, **k):
        super().__init__()
        ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        self.weight, self.stride = _Param(out_channels, in_channels // groups, *ks), stride
        if bias:
            self.bias = _Param(out_channels)


class _LayerNorm(_Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, *a, **k):
        super().__init__()
        self.eps = eps
        if elementwise_affine:
            self.weight = _Param(normalized_shape)
            if bias:
                self.bias = _Param(normalized_shape)


class _Embedding(_Module):
    def __init__(self, num_embeddings, embedding_dim, *a, **k):
        super().__init__()
        self.weight = _Param(num_embeddings, embedding_dim)


class _GroupNorm(_Module):
    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *a, **k):
        super().__init__()
        if affine:
            self.weight, self.bias = _Param(num_channels), _Param(num_channels)


class _Torch(types.SimpleNamespace):
    def __getattr__(self, name):          # torch.float32, torch.Tensor, ...: values never read here
        return _Value()


_NN = types.SimpleNamespace(Module=_Module, ModuleList=_ModuleList, Linear=_Linear, Conv2d=_Conv2d, LayerNorm=_LayerNorm,
                            Embedding=_Embedding, GroupNorm=_GroupNorm, Parameter=lambda t, requires_grad=True: _Param(*t.shape),
                            **{n: type(n, (_Module,), {}) for n in ("Dropout", "SiLU", "GELU", "Mish", "ReLU", "Identity", "Tanh")})


def _register_to_config(init):
    """diffusers' decorator as far as ``self.config`` goes: the bound __init__ arguments."""
    def wrapper(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        object.__setattr__(self, "config", types.SimpleNamespace(**dict(list(bound.arguments.items())[1:])))
        init(self, *args, **kwargs)
    return wrapper


class _Strip(ast.NodeTransformer):
    """Decorators other than register_to_config / property / staticmethod / classmethod dropped
    (maybe_allow_in_graph and friends are torch.compile hints); imports inside functions dropped."""
    keep = {"register_to_config", "property", "staticmethod", "classmethod"}

    def visit_FunctionDef(self, node):
        node.decorator_list = [d for d in node.decorator_list if isinstance(d, ast.Name) and d.id in self.keep]
        self.generic_visit(node)
        return node

    def visit_ClassDef(self, node):
        node.decorator_list = []
        self.generic_visit(node)
        return node

    def visit_Import(self, node):
        return ast.Pass()

    visit_ImportFrom = visit_Import


def diffusers_namespace() -> dict:
    """Every top-level class and function of diffusers' DiT source files (and their UPPER_CASE
    tables), compiled from the installed source into one namespace over the torch stand-in.
    Names the files import from elsewhere and that a class needs at definition time (mixin bases)
    become empty modules; a name used only by a branch the DiT never takes is never looked up."""
    ns = {"__name__": "diffusers_source", "nn": _NN, "torch": _Torch(nn=_NN), "F": types.SimpleNamespace(scaled_dot_product_attention=None),
          "math": math, "np": np, "Any": typing.Any, "register_to_config": _register_to_config, "ModelMixin": _Module,
          "ConfigMixin": object, "logger": types.SimpleNamespace(info=print, warning=print), "deprecate": lambda *a, **k: None}
    flags = __import__("__future__").annotations.compiler_flag     # annotations stay strings
    defined: dict[str, str] = {}
    for rel in SOURCES:
        for node in ast.parse((DIFFUSERS / rel).read_text()).body:
            table = isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
            if not (table or isinstance(node, (ast.ClassDef, ast.FunctionDef))):
                continue
            if not table:
                assert node.name not in defined, f"{node.name} in both {defined[node.name]} and {rel}"
                defined[node.name] = rel
            code = compile(ast.fix_missing_locations(ast.Module([_Strip().visit(node)], [])), str(DIFFUSERS / rel), "exec",
                           flags=flags, dont_inherit=True)
            for _ in range(10):
                try:
                    exec(code, ns)
                    break
                except NameError as e:
                    ns[e.name] = type(e.name, (_Module,), {})
    ns["get_2d_sincos_pos_embed"] = lambda *a, **k: _Value()    # a buffer's values: torch arithmetic
    return ns


_NS: dict = {}


def diffusers_model(config: dict):
    """diffusers' DiTTransformer2DModel(**config), built by its own __init__ (module doc)."""
    if not _NS:
        _NS.update(diffusers_namespace())
    return _NS["DiTTransformer2DModel"](**config)


def init_signature() -> dict:
    """DiTTransformer2DModel.__init__'s arguments and defaults, read from the source with ast."""
    tree = ast.parse((DIFFUSERS / DIT_SOURCE).read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DiTTransformer2DModel")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    args = init.args.args[1:]
    return {a.arg: ast.literal_eval(d) for a, d in zip(args, init.args.defaults[-len(args):])}


# ------------------------------------------------------------------------------------------------
# folders written as diffusers writes them, and the reference
# ------------------------------------------------------------------------------------------------

def random_state(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 tensors for diffusers' state dict of ``config`` (keys and shapes from its
    __init__): Linear / Conv2d weights N(0, 1/fan_in), the class tables N(0, 1), biases N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in sorted(diffusers_model(config).state_shapes().items()):
        assert shape is not None, f"a persistent buffer {k}: the writer would have to know its values"
        if k.endswith("embedding_table.weight"):
            a = rng.standard_normal(shape)
        elif k.endswith(".weight") and len(shape) > 1:
            a = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        else:
            a = 0.1 * rng.standard_normal(shape)
        out[k] = a.astype(np.float32)
    return out


def write_folder(path: Path, config: dict, state: dict | None = None, seed: int = 0, class_name: str = "DiTTransformer2DModel",
                 dtype=np.float32) -> dict:
    """A diffusers PyTorch DiT folder: config.json (every __init__ key) and the state dict."""
    state = random_state(config, seed) if state is None else state
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"_class_name": class_name, "_diffusers_version": "0.39.0",
                                                  **init_signature(), **config}))
    save_file({k: np.ascontiguousarray(v.astype(dtype)) for k, v in state.items()}, str(path / "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    return state


def gelu(x, approximate: bool):
    if approximate:
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def reference_dit(sd: dict, cfg: dict, x, t, y):
    """DiT's output (B, out_channels, S, S) in NumPy float64, from the paper's equations (module
    doc) on the PyTorch state dict ``sd`` (Linear: h W^T + b; Conv2d weight (D, C, p, p))."""
    cfg = {**init_signature(), **cfg}
    w = {k: np.asarray(v, np.float64) for k, v in sd.items()}

    def lin(h, name):
        return h @ w[name + ".weight"].T + (w[name + ".bias"] if name + ".bias" in w else 0.0)

    def ln(h, eps):
        mu = h.mean(-1, keepdims=True)
        return (h - mu) / np.sqrt(((h - mu) ** 2).mean(-1, keepdims=True) + eps)

    def silu(h):
        return h / (1 + np.exp(-h))

    x, t, y = np.asarray(x, np.float64), np.asarray(t), np.asarray(y)
    B, C, S, _ = x.shape
    p, H, hd = cfg["patch_size"], cfg["num_attention_heads"], cfg["attention_head_dim"]
    D, g, Co = H * hd, S // p, cfg["out_channels"] or C
    # patchify: token i * g + j is the (C, p, p) patch at rows i p.., columns j p..; its linear
    # embedding is the stride-p convolution's weight applied to it
    patches = x.reshape(B, C, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    tokens = patches @ w["pos_embed.proj.weight"].reshape(D, C * p * p).T + w["pos_embed.proj.bias"]
    # 2-D sin-cos positions: [sincos(D/2, column), sincos(D/2, row)], sincos(d, u) = [sin(u w_k), cos(u w_k)],
    # w_k = 10000^(-k / (d / 2)); held in float32
    omega = 1.0 / 10000 ** (np.arange(D // 4) / (D / 4))
    rows, cols = np.divmod(np.arange(g * g), g)
    one = lambda u: np.concatenate([np.sin(np.outer(u, omega)), np.cos(np.outer(u, omega))], 1)  # noqa: E731
    tokens = tokens + np.concatenate([one(cols), one(rows)], 1).astype(np.float32)
    # timestep frequency embedding: [cos(t f_k), sin(t f_k)], f_k = 10000^(-k / (128 - 1)), k < 128
    f = np.exp(-math.log(10000) * np.arange(128) / 127)
    e = np.concatenate([np.cos(np.outer(t, f)), np.sin(np.outer(t, f))], 1)
    h, c0 = tokens, None
    for i in range(cfg["num_layers"]):
        b = f"transformer_blocks.{i}."
        c = lin(silu(lin(e, b + "norm1.emb.timestep_embedder.linear_1")), b + "norm1.emb.timestep_embedder.linear_2") \
            + w[b + "norm1.emb.class_embedder.embedding_table.weight"][y]
        c0 = c if c0 is None else c0                  # the final layer: block 0's c
        sh1, sc1, g1, sh2, sc2, g2 = np.split(lin(silu(c), b + "norm1.linear"), 6, axis=-1)
        a = ln(h, 1e-6) * (1 + sc1[:, None]) + sh1[:, None]
        q, k, v = (lin(a, b + f"attn1.to_{n}").reshape(B, g * g, H, hd) for n in "qkv")
        logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        h = h + g1[:, None] * lin(np.einsum("bhqk,bkhd->bqhd", att, v).reshape(B, g * g, D), b + "attn1.to_out.0")
        m = ln(h, cfg["norm_eps"]) * (1 + sc2[:, None]) + sh2[:, None]
        m = lin(gelu(lin(m, b + "ff.net.0.proj"), cfg["activation_fn"] == "gelu-approximate"), b + "ff.net.2")
        h = h + g2[:, None] * m
    shift, scale = np.split(lin(silu(c0), "proj_out_1"), 2, axis=-1)
    out = lin(ln(h, 1e-6) * (1 + scale[:, None]) + shift[:, None], "proj_out_2")       # (B, N, p * p * Co)
    # unpatchify: entry (a, b, c) of token (i, j) is pixel (c, i p + a, j p + b)
    return out.reshape(B, g, g, p, p, Co).transpose(0, 5, 1, 3, 2, 4).reshape(B, Co, S, S)


def reference_eps(sd, cfg, z, t, y, s=None):
    """The generator's eps for one latent: the first in_channels channels, classifier-free guided."""
    C = z.shape[0]
    if s is None:
        return reference_dit(sd, cfg, z[None], [t], [y])[0, :C]
    out = reference_dit(sd, cfg, np.stack([z, z]), [t, t], [cfg["num_embeds_ada_norm"], y])[:, :C]
    return out[0] + s * (out[1] - out[0])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A DiT pipeline folder: transformer/ (TINY), scheduler/, vae/ (a tiny SD-style AutoencoderKL,
    latents 4 x 8 x 8 -> 3 x 16 x 16, written by write_pytorch_folder)."""
    from geomjobs.generators.diffusers import write_pytorch_folder

    from diffusers_tiny import tiny_vae

    root = tmp_path_factory.mktemp("dit-pipe")
    state = write_folder(root / "transformer", TINY)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    vae, params = tiny_vae(sample_size=16)
    write_pytorch_folder(params, vae.config, root / "vae")
    return root, state


def dit_spec(root, **kw):
    return {"kind": "dit", "path": str(root), "subfolder": "transformer", "class_label": 3, **kw}


def latent(seed=0, shape=(4, 8, 8)):
    return np.random.default_rng(seed).standard_normal(shape)


# ------------------------------------------------------------------------------------------------
# (a) the layout is diffusers' own
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"out_channels": None, "attention_bias": False, "activation_fn": "gelu", "num_layers": 3,
                                            "norm_eps": 1e-6, "num_embeds_ada_norm": 1}])
def test_key_set_and_shapes_are_diffusers_own(overrides):
    config = {**TINY, **overrides}
    model = diffusers_model(config)
    ours = pytorch_shapes(DiTConfig.from_json(config))
    assert ours == model.state_shapes()               # every key, every shape; no persistent buffer
    assert "pos_embed" in model.pos_embed._buffers and not model.pos_embed._buffers["pos_embed"]   # recomputed, never stored
    # the constants the Flax module computes with are the ones diffusers' constructors set
    blk = model.transformer_blocks[0]
    emb = blk.norm1.emb
    assert (emb.time_proj.num_channels, emb.time_proj.flip_sin_to_cos, emb.time_proj.downscale_freq_shift) == \
        (TIME_CHANNELS, True, TIME_FREQ_SHIFT)
    assert emb.class_embedder.num_classes == config["num_embeds_ada_norm"]          # + 1 row: the null class
    assert blk.norm1.norm.eps == model.norm_out.eps == ADA_EPS
    assert blk.norm3.eps == config.get("norm_eps", CONFIG_DEFAULTS["norm_eps"])
    assert blk.ff.net[0].approximate == ("none" if config.get("activation_fn") == "gelu" else "tanh")
    assert blk.attn1.heads == config["num_attention_heads"] and blk.attn1.scale == config["attention_head_dim"] ** -0.5
    assert model.pos_embed.proj.stride == config["patch_size"] and blk.attn2 is None and blk.norm2 is None


def test_config_keys_and_defaults_are_the_init_signature():
    assert CONFIG_DEFAULTS == init_signature()
    cfg = DiTConfig.from_json(TINY)
    written = cfg.to_json()
    assert set(written) == set(init_signature()) | {"_class_name", "_diffusers_version"}
    assert DiTConfig.from_json(written) == cfg
    assert DiTConfig.from_json({"out_channels": 8}) == DiTConfig()    # DiT-XL/2-256: the defaults, learned sigma
    assert (DiTConfig().inner_dim, DiTConfig().num_layers, DiTConfig().learned_sigma) == (1152, 28, True)


def test_write_dit_folder_writes_diffusers_keys_and_reads_back_exactly(tmp_path):
    # the writer (benchmarks, users' conversions) against diffusers' own state dict; read back bit for bit
    from safetensors.numpy import load_file

    from geomjobs.generators.dit_layout import random_dit_params, write_dit_folder

    cfg = DiTConfig.from_json(TINY)
    params = random_dit_params(cfg, seed=3)
    write_dit_folder(params, cfg, tmp_path / "m")
    written = load_file(str(tmp_path / "m" / "diffusion_pytorch_model.safetensors"))
    assert {k: v.shape for k, v in written.items()} == diffusers_model(TINY).state_shapes()
    assert set(json.loads((tmp_path / "m" / "config.json").read_text())) == set(init_signature()) | {"_class_name", "_diffusers_version"}
    _, _, back = load_dit_folder(str(tmp_path / "m"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)


# ------------------------------------------------------------------------------------------------
# (b) the forward pass against the paper's equations
# ------------------------------------------------------------------------------------------------

def test_forward_matches_the_numpy_reference(pipe):
    root, state = pipe
    cfg, module, params = load_dit_folder(str(root / "transformer"), jnp.float64)
    assert cfg == DiTConfig.from_json(TINY)
    x = np.stack([latent(i) for i in range(4)])
    y = np.array([0, 3, 9, 10])                       # 10: the null class
    fwd = jax.jit(lambda x, t, y: module.apply({"params": params}, x, t, y))
    for t, tol in ((np.zeros(4, int), 1e-10), (np.array([1, 37, 500, 999]), 1e-4)):
        got = np.asarray(fwd(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
        ref = reference_dit(state, TINY, x, t, y)
        assert got.shape == (4, 8, 8, 8)
        np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    # float32 params and activations
    _, m32, p32 = load_dit_folder(str(root / "transformer"), jnp.float32)
    got = np.asarray(jax.jit(m32.apply)({"params": p32}, jnp.asarray(x, jnp.float32), jnp.asarray([0, 5, 50, 900]), jnp.asarray(y)))
    ref = reference_dit(state, TINY, x, [0, 5, 50, 900], y)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_fp16_legacy_class_and_other_configs_load(tmp_path):
    # an F16 checkpoint widens exactly; the Transformer2DModel name of diffusers 0.12's DiT configs reads as DiT
    cfg = {**TINY, "out_channels": None, "attention_bias": False, "activation_fn": "gelu", "norm_eps": 1e-6}
    state = write_folder(tmp_path / "m", cfg, seed=1, class_name="Transformer2DModel", dtype=np.float16)
    _, module, params = load_dit_folder(str(tmp_path / "m"), jnp.float64)
    x = np.stack([latent(1), latent(2)])
    got = np.asarray(jax.jit(module.apply)({"params": params}, jnp.asarray(x), jnp.zeros(2, jnp.int32), jnp.asarray([1, 2])))
    ref = reference_dit({k: v.astype(np.float16) for k, v in state.items()}, cfg, x, [0, 0], [1, 2])
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    assert got.shape == (2, 4, 8, 8)                  # no learned sigma: out_channels = in_channels


# ------------------------------------------------------------------------------------------------
# (c) the generator: eps / x0 / classifier-free guidance / the denoiser
# ------------------------------------------------------------------------------------------------

def test_generator_eps_x0_guidance_and_denoiser(pipe):
    root, state = pipe
    abar = diffusion.abar(betas=diffusion.diffusers_betas(SCHEDULER))
    z = latent(5)
    zj = jnp.asarray(z)
    for s, t, pred in ((None, 0, None), (1.0, 250, "eps"), (4.0, 0, None), (0.0, 250, "eps")):
        section = dit_spec(root, dtype="float64", **({} if s is None else {"cfg_scale": s}),
                           **({} if t == 0 else {"timestep": t}), **({} if pred is None else {"prediction": pred}))
        kept = copy.deepcopy(section)
        gen = build_generator(section, "float64")
        assert section == kept and gen.resolved == {**kept, "timestep": t, "prediction": pred or "x0"}
        assert gen.latent_shape == gen.output_shape == (4, 8, 8) and gen.cfg_scale == s
        eps = reference_eps(state, TINY, z, t, 3, None if s in (None, 1.0) else s)
        want = eps if pred == "eps" else (z - np.sqrt(1 - abar[t]) * eps) / np.sqrt(abar[t])
        tol = 1e-10 if t == 0 else 1e-4                 # module doc: the float32 sinusoid at t > 0
        np.testing.assert_allclose(np.asarray(jax.jit(gen.apply)(gen.params, zj)), want, rtol=tol, atol=tol)
        # one forward branch without guidance (s absent or 1), two with it; every GELU is a delta site
        gelu = [si for si in trace_sites(lambda v, g=gen: g.apply(g.params, v), zj) if si.name == "tanh"]
        assert [si.shape for si in gelu] == [(1 if s in (None, 1.0) else 2, 16, 128)] * 2
    np.testing.assert_array_equal(gen.denoiser.abar, abar)
    eps_t = jax.jit(gen.denoiser.eps)
    for t in (999, 17):
        np.testing.assert_allclose(np.asarray(eps_t(gen.params, zj, jnp.int32(t))), reference_eps(state, TINY, z, t, 3, 0.0),
                                   rtol=1e-4, atol=1e-4)
    # without a scheduler (a bare transformer folder): DiT's linear 1e-4..0.02, T = 1000
    gen = build_generator({"kind": "dit", "path": str(root / "transformer"), "class_label": 0})
    np.testing.assert_array_equal(gen.denoiser.abar, diffusion.abar({"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}))
    assert gen.model_id == "dit:transformer" and gen.cfg_scale is None and gen.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------
# (d) jobs: sampled with CFG (decoded by the pipeline's VAE), trajectory
# ------------------------------------------------------------------------------------------------

def ddim_reference(state, z_T, steps, y, s, abar):
    """Deterministic DDIM (eta 0, leading spacing, final abar 1) on the reference's guided eps."""
    z = np.asarray(z_T, np.float64)
    ts = sampling.timesteps(len(abar), steps)
    targets = np.append(abar[ts][1:], 1.0)
    for t, a_prev in zip(ts, targets):
        e = reference_eps(state, TINY, z, int(t), y, s)
        x0 = (z - np.sqrt(1 - abar[t]) * e) / np.sqrt(abar[t])
        z = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * e
    return z


def test_sampled_job_with_guidance_decoded_by_the_vae(pipe, tmp_path):
    import pandas as pd

    from geomjobs import run_job

    root, state = pipe
    spec = {"model": {"kind": "diffusers-vae-decoder", "path": str(root), "subfolder": "vae"},
            "latents": {"kind": "sampled", "model": dit_spec(root, cfg_scale=4.0), "count": 2, "seed": 7,
                        "sampler": {"kind": "ddim", "steps": 4}, "save_latent": True, "batch_size": 2},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 8}, "local_rank": {}},
            "execution": {"shard_size": 2, "batch_size": 2}}
    run_job(spec, str(tmp_path / "sampled"))
    df = pd.read_parquet(tmp_path / "sampled").sort_values("sample_id").reset_index(drop=True)
    assert list(df.status) == ["ok", "ok"] and list(df.cfg_scale) == [4.0, 4.0]
    assert np.isfinite(df.local_scaling).all()
    abar = diffusion.abar(betas=diffusion.diffusers_betas(SCHEDULER))
    for i in range(2):
        want = ddim_reference(state, sampling.initial_noise(7, i, (4, 8, 8)), 4, 3, 4.0, abar)
        np.testing.assert_allclose(np.asarray(df.z[i]).reshape(4, 8, 8), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.slow   # ~7 s: another sampler and step compiled
def test_trajectory_job_evaluates_the_dit_at_each_state(pipe, tmp_path):
    import pandas as pd

    from geomjobs import run_job

    root, state = pipe
    # the guided DiT along its own sampling trajectories: every record at its state's timestep
    traj = {"model": dit_spec(root, cfg_scale=4.0),
            "latents": {"kind": "trajectory", "model": dit_spec(root, cfg_scale=4.0), "count": 1, "seed": 7,
                        "sampler": {"kind": "ddim", "steps": 4}, "save_latent": True, "batch_size": 1},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4}}, "execution": {"shard_size": 5, "batch_size": 5}}
    run_job(traj, str(tmp_path / "traj"))
    df = pd.read_parquet(tmp_path / "traj").sort_values("sample_id").reset_index(drop=True)
    assert list(df.status) == ["ok"] * 5 and list(df.step) == [0, 1, 2, 3, 4] and list(df.cfg_scale) == [4.0] * 5
    abar = diffusion.abar(betas=diffusion.diffusers_betas(SCHEDULER))
    final = ddim_reference(state, sampling.initial_noise(7, 0, (4, 8, 8)), 4, 3, 4.0, abar)
    np.testing.assert_allclose(np.asarray(df.z[4]).reshape(4, 8, 8), final, rtol=1e-4, atol=1e-4 * np.abs(final).max())


def test_a_remote_pipeline_copies_the_transformer_weights_and_the_scheduler_only(pipe, tmp_path, monkeypatch):
    """gs:// goes through fsspec like any remote URI (as for the diffusers kinds); memory:// takes
    the same copy path: transformer/'s config and safetensors and scheduler/ are copied, not vae/,
    a .bin pickle or Flax weights beside them."""
    import fsspec

    root, _ = pipe
    monkeypatch.setenv("GEOMJOBS_CACHE_DIR", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    base = f"/geomjobs-dit-{tmp_path.name}"
    for sub in ("transformer", "scheduler", "vae"):
        fs.put(str(root / sub), f"{base}/{sub}", recursive=True)
    fs.pipe({f"{base}/transformer/diffusion_pytorch_model.bin": b"pickle", f"{base}/transformer/diffusion_flax_model.msgpack": b"x"})
    try:
        gen = build_generator(dit_spec(f"memory://{base}"))
        (entry,) = os.listdir(tmp_path / "cache")
        assert sorted(os.listdir(tmp_path / "cache" / entry)) == [".complete", "scheduler", "transformer"]
        assert sorted(os.listdir(tmp_path / "cache" / entry / "transformer")) == ["config.json", "diffusion_pytorch_model.safetensors"]
        ref = build_generator(dit_spec(root))
        jax.tree_util.tree_map(np.testing.assert_array_equal, gen.params, ref.params)
        np.testing.assert_array_equal(gen.denoiser.abar, ref.denoiser.abar)            # the copied scheduler's
    finally:
        fs.rm(base, recursive=True)


def test_the_cluster_spec_plans_on_the_tiny_pipeline(pipe, tmp_path):
    # cluster/jobs/dit-xl2-psi.yaml with its folder swapped for the tiny pipeline (and k, count
    # shrunk to its sizes): every key is read by the planner, delta's `layers: [ff]` names the GELUs
    from geomjobs.runner.plan import plan_job

    root, _ = pipe
    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "cluster" / "jobs" / "dit-xl2-psi.yaml").read_text())
    for section in (spec["model"], spec["latents"]["model"]):
        assert section["path"].endswith("DiT-XL-2-256") and section["class_label"] == 207
        section.update(path=str(root), class_label=7)
    spec["latents"].update(count=2, batch_size=2)
    spec["descriptors"]["local_scaling"]["k"] = 8
    spec["output"] = str(tmp_path / "out")
    plan = plan_job(spec)
    assert plan.generator.cfg_scale == 4.0 and plan.generator.latent_shape == (4, 8, 8)
    assert [lbl.split("/")[-2:] for lbl in plan.site_labels] == [["net_0", "tanh#2"], ["net_0", "tanh#5"]]


# ------------------------------------------------------------------------------------------------
# (e) dit-digits is the same architecture
# ------------------------------------------------------------------------------------------------

def digits_in_diffusers_layout(module, params):
    """dit-digits' trained params as the diffusers DiT's (module doc): hidden channel j of the
    diffusers model is dit-digits' channel (j + D/2) mod D (its position table has the row half
    first); q/k/v split from the fused qkv; the one timestep MLP copied into every block; one
    class and its null row, both zero."""
    p = jax.tree_util.tree_map(np.asarray, params["params"])
    D = module.dim
    perm = (np.arange(D) + D // 2) % D

    def dense(w, rows=False, cols=False, chunks=1):
        k, b = w["kernel"], w["bias"]
        if rows:
            k = k[perm]
        if cols:
            idx = np.concatenate([c * D + perm for c in range(chunks)])
            k, b = k[:, idx], b[idx]
        return {"kernel": k, "bias": b}

    temb = {"linear_1": dense(p["t_embed_1"]), "linear_2": dense(p["t_embed_2"])}
    zero_table = np.zeros((2, D), np.float32)
    out = {"pos_embed": {"proj": {"kernel": p["patch_embed"]["kernel"][:, perm].reshape(2, 2, 1, D),
                                  "bias": p["patch_embed"]["bias"][perm]}},
           "proj_out_1": dense(p["final_adaLN"], cols=True, chunks=2), "proj_out_2": dense(p["final"], rows=True)}
    for i in range(module.depth):
        b = p[f"block_{i}"]
        q, k, v = np.split(b["attn"]["qkv"]["kernel"], 3, axis=1)
        qb, kb, vb = np.split(b["attn"]["qkv"]["bias"], 3)
        out[f"transformer_blocks_{i}"] = {
            "norm1": {"emb": {"timestep_embedder": temb, "class_embedder": {"embedding_table": {"embedding": zero_table}}},
                      "linear": dense(b["adaLN"], cols=True, chunks=6)},
            "attn1": {"to_q": {"kernel": q[perm], "bias": qb}, "to_k": {"kernel": k[perm], "bias": kb},
                      "to_v": {"kernel": v[perm], "bias": vb}, "to_out_0": dense(b["attn"]["proj"], cols=True)},
            "ff": {"net_0": {"proj": dense(b["fc1"], rows=True)}, "net_2": dense(b["fc2"], cols=True)}}
    cfg = DiTConfig(module.heads, module.dim // module.heads, 1, 1, module.depth, module.image_size, module.patch, 1,
                    True, "gelu-approximate", 1e-6)
    return cfg, out


def test_dit_digits_at_t0_is_the_general_module():
    from geomjobs.generators.dit import dit_generator, load_dit

    module, params, meta = load_dit()
    cfg, p = digits_in_diffusers_layout(module, params)
    assert jax.tree_util.tree_map(np.shape, p) == jax.tree_util.tree_map(lambda a: a.shape, param_shapes(cfg))
    gen = dit_from_module(DiTTransformer2D(cfg), p, 0, None, 0, diffusion.abar(meta["schedule"]))
    digits = dit_generator()                           # x0 at t = 0, on (8, 8)
    z = np.random.default_rng(3).standard_normal((5, 8, 8)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda v: gen.apply(gen.params, v[None])[0]))(jnp.asarray(z))
    want = jax.jit(jax.vmap(lambda v: digits.apply(digits.params, v)))(jnp.asarray(z))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# (f) bad input: exit 2 before any work, naming the key and the file
# ------------------------------------------------------------------------------------------------

def test_class_label_outside_the_classes_exits_2(pipe, tmp_path, capsys):
    from geomjobs.cli import main

    root, _ = pipe
    spec = {"model": dit_spec(root, class_label=10), "latents": {"kind": "gaussian", "count": 2, "shape": [4, 8, 8]},
            "descriptors": {"local_scaling": {"mode": "projection", "k": 4}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "model.class_label" in err and "expected 0..9" in err and "config.json" in err and "null class" in err, err
    assert not (tmp_path / "out").exists()
    spec["model"]["class_label"] = 3
    spec["latents"]["shape"] = [4, 16, 16]            # latents of another shape than the config's
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out"), "-q"]) == 2
    assert "latents.shape" in capsys.readouterr().err and not (tmp_path / "out").exists()


def _mutated(tmp_path, name, config=None, state_fn=None, **kw):
    cfg = {**TINY, **(config or {})}
    state = random_state(TINY)
    if state_fn:
        state = state_fn(state)
    write_folder(tmp_path / name / "transformer", cfg, state, **kw)
    return tmp_path / name


@pytest.mark.parametrize("case,key,message", [
    ("shape", "model.subfolder", r"tensor 'pos_embed.proj.bias' has shape \[32\]; the DiTTransformer2DModel of config.json needs \[48\]"),
    ("missing", "model.subfolder", r"has no tensor 'proj_out_2.bias', which the DiTTransformer2DModel of config.json needs"),
    ("extra", "model.subfolder", r"tensor 'down_blocks.0.resnets.0.conv1.weight' is not a parameter of the DiTTransformer2DModel "
                                 r"of config.json \(it looks like a UNet2DConditionModel's weights\)"),
    ("norm_type", "model.subfolder", r"config.json' sets norm_type: \"ada_norm\"; a DiT is ada_norm_zero"),
    ("geglu", "model.subfolder", r"sets activation_fn: \"geglu\""),
    ("out_channels", "model.subfolder", r"sets out_channels: 5; expected in_channels \(4: eps\) or 2 x in_channels"),
    ("sample_size", "model.subfolder", r"sets sample_size: 9; not a multiple of patch_size 2"),
    ("unet", "model.subfolder", r"is a UNet2DConditionModel config; expected a DiTTransformer2DModel"),
    ("flax", "model.subfolder", r"has only Flax weights"),
    ("timestep", "model.timestep", r"expected 0..999 \(the schedule has 1000 steps\), got 1000"),
    ("v_prediction", "model.scheduler_config", r"prediction_type 'v_prediction'; a DiT predicts eps"),
])
def test_bad_folders_and_sections_are_refused_naming_key_and_file(pipe, tmp_path, case, key, message):
    root, _ = pipe
    section = dit_spec(root)
    if case == "shape":
        section = dit_spec(_mutated(tmp_path, case, {"attention_head_dim": 24}))
    elif case == "missing":
        section = dit_spec(_mutated(tmp_path, case, state_fn=lambda s: {k: v for k, v in s.items() if k != "proj_out_2.bias"}))
    elif case == "extra":
        unet_key = "down_blocks.0.resnets.0.conv1.weight"
        section = dit_spec(_mutated(tmp_path, case, state_fn=lambda s: {**s, unet_key: np.zeros(3, np.float32)}))
    elif case in ("norm_type", "geglu", "out_channels", "sample_size", "unet"):
        cfg = {"norm_type": {"norm_type": "ada_norm"}, "geglu": {"activation_fn": "geglu"}, "out_channels": {"out_channels": 5},
               "sample_size": {"sample_size": 9}, "unet": {}}[case]
        folder = _mutated(tmp_path, case)
        raw = json.loads((folder / "transformer" / "config.json").read_text())
        raw.update(cfg, **({"_class_name": "UNet2DConditionModel"} if case == "unet" else {}))
        (folder / "transformer" / "config.json").write_text(json.dumps(raw))
        section = dit_spec(folder)
    elif case == "flax":
        folder = _mutated(tmp_path, case)
        (folder / "transformer" / "diffusion_pytorch_model.safetensors").rename(folder / "transformer" / "diffusion_flax_model.msgpack")
        section = dit_spec(folder)
    elif case == "timestep":
        section = dit_spec(root, timestep=1000)
    elif case == "v_prediction":
        section = dit_spec(root, scheduler_config={**SCHEDULER, "prediction_type": "v_prediction"})
    with pytest.raises(SpecError) as e:
        build_generator(section)
    assert e.value.key == key and __import__("re").search(message, e.value.message), e.value.message
    if case in ("shape", "missing", "extra"):
        assert "diffusion_pytorch_model.safetensors" in e.value.message


def test_schema_requires_path_and_class_label():
    from geomjobs.spec import validate_spec

    base = {"latents": {"kind": "gaussian", "count": 1, "shape": [4, 8, 8]}, "descriptors": {"local_rank": {}}}
    with pytest.raises(SpecError, match="class_label"):
        validate_spec({**base, "model": {"kind": "dit", "path": "x"}})
    with pytest.raises(SpecError, match="class_label"):
        validate_spec({**base, "model": {"kind": "dit", "path": "x", "class_label": -1}})
    with pytest.raises(SpecError, match="guidance_scale"):
        validate_spec({**base, "model": {"kind": "dit", "path": "x", "class_label": 1, "guidance_scale": 4.0}})
