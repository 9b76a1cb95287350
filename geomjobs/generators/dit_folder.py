"""``kind: dit``: a diffusers ``DiTTransformer2DModel`` folder (DiT-XL/2 and its family; the model
and its weights: :mod:`geomjobs.generators.dit_layout`), as G(z) = the class-conditional x0
prediction (default) or eps at ``timestep`` (default 0, the DiT paper's analysis) for latent
z = x_t (C, S, S), channels-first:

    eps   = the first in_channels output channels (DiT's learned sigma: the rest are variances)
    guided eps = eps(z, t, null) + s (eps(z, t, y) - eps(z, t, null))     s = cfg_scale, null = num_classes
            (s absent or 1: eps(z, t, y) alone, no null branch; otherwise both branches in one batch of 2)
    x0    = (z - sqrt(1 - abar_t) eps) / sqrt(abar_t)

Keys: ``path`` (a DiT folder, or a pipeline folder with ``subfolder: transformer``; local or gs://,
copied once into the model cache as the diffusers kinds do), ``class_label`` (0 .. num_classes - 1
of config.json's ``num_embeds_ada_norm``), ``cfg_scale``, ``timestep``, ``prediction`` (x0 | eps),
``scheduler_config``, ``dtype``, ``remat``, ``model_id``. abar comes from ``scheduler_config``, else
the pipeline's ``scheduler/scheduler_config.json`` next to ``subfolder``, else DiT's training
schedule (linear betas 1e-4 .. 0.02, T = 1000); a scheduler whose prediction_type is not epsilon
is refused (a DiT predicts eps).

The generator carries its :class:`~geomjobs.generators.base.Denoiser` (the same guided eps at any
traced timestep), so ``latents: {kind: sampled | trajectory, model: {kind: dit, ...}}`` sample it
with classifier-free guidance. The SD VAE (e.g. sd-vae-ft-ema, the DiT pipeline's ``vae``) decodes
those latents as ``kind: diffusers-vae-decoder``; kind dit itself has no VAE key.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.errors import SpecError
from geomjobs.generators.base import Denoiser, Generator
from geomjobs.generators.diffusers import pytorch_weights as ptw
from geomjobs.generators.diffusers.folders import Numerics, cast_params, compute_dtype, default_model_id, local_model_folder, with_remat
from geomjobs.generators.dit_layout import DiTTransformer2D, load_dit_folder

PREDICTIONS = ("x0", "eps")
DEFAULTS = {"timestep": 0, "prediction": "x0"}          # the DiT paper's analysis: x0 at t = 0


def dit_folder_generator(model: dict, dtype=jnp.float32) -> Generator:
    """``kind: dit`` from a schema-validated section (keys: module doc); every check before any work."""
    numerics = Numerics(compute_dtype(model), dtype, model.get("remat", "none"))
    root, where, key = dit_folder(model)
    cfg, module, params = load_dit_folder(where, numerics.compute, key)
    label = model["class_label"]
    if not 0 <= label < cfg.num_classes:
        raise SpecError("model.class_label", f"expected 0..{cfg.num_classes - 1}: '{os.path.join(where, 'config.json')}' has "
                                             f"num_embeds_ada_norm = {cfg.num_classes} classes (label {cfg.num_classes} is "
                                             f"the null class, which cfg_scale uses); got {label}")
    abar = schedule(model, root)
    resolved = {**model, **{k: model.get(k, v) for k, v in DEFAULTS.items()}}
    if resolved["timestep"] >= len(abar):
        raise SpecError("model.timestep", f"expected 0..{len(abar) - 1} (the schedule has {len(abar)} steps), got "
                                          f"{resolved['timestep']}")
    gen = dit_from_module(module, params, label, model.get("cfg_scale"), resolved["timestep"], abar, resolved["prediction"],
                          numerics, default_model_id(model, "dit"))
    return dataclasses.replace(gen, resolved=resolved)


def dit_folder(model: dict) -> tuple[str, str, str]:
    """(local root, local model folder, the spec key that names it) of a section, checked: a
    remote folder is copied with its scheduler/ and only the safetensors the loader reads."""
    sub, path = model.get("subfolder"), model["path"]
    key = "model.subfolder" if sub else "model.path"
    keep = lambda names: ptw.keep_for_copy([n for n in names if n != ptw.FLAX_WEIGHTS], key, path)  # noqa: E731
    root = local_model_folder(path, (sub,) if sub else (), ("scheduler",), select=keep)
    where = os.path.join(root, sub) if sub else root
    if sub and not os.path.isdir(where):
        raise SpecError("model.subfolder", f"'{path}' has no subfolder '{sub}' ('{where}' does not exist)")
    if not os.path.isfile(os.path.join(where, "config.json")):
        hint = "; for a pipeline folder set subfolder: transformer" if not sub else ""
        raise SpecError(key, f"'{where}' has no config.json: expected a diffusers DiTTransformer2DModel folder{hint}")
    return root, where, key


def schedule(model: dict, root: str) -> np.ndarray:
    """abar (T,) float64: of ``scheduler_config``, else of ``root/scheduler/scheduler_config.json``,
    else DiT's training schedule (linear 1e-4 .. 0.02, T = 1000)."""
    sched, where = model.get("scheduler_config"), "model.scheduler_config"
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    if sched is None and os.path.isfile(path):
        with open(path) as f:
            sched, where = json.load(f), f"'{path}'"
    if sched is None:
        return diffusion.abar(diffusion.DEFAULT_SCHEDULE)
    kind = sched.get("prediction_type", "epsilon")
    if kind != "epsilon":
        raise SpecError("model.scheduler_config", f"{where} has prediction_type {kind!r}; a DiT predicts eps (epsilon)")
    try:
        return diffusion.abar(betas=diffusion.diffusers_betas(sched))
    except (ValueError, TypeError) as e:
        raise SpecError("model.scheduler_config", f"{where}: {e}") from None


def dit_eps(module: DiTTransformer2D, class_label: int, cfg_scale: float | None, numerics: Numerics = Numerics()):
    """eps(p, z, t): the (guided) eps of ONE latent z (C, S, S) at timestep t (traced or not), in
    ``numerics.out`` (module doc); p = the module's params in ``numerics.compute``."""
    cfg, compute, out_dtype = module.config, numerics.compute, numerics.out
    s = None if cfg_scale is None or float(cfg_scale) == 1.0 else float(cfg_scale)
    labels = np.array([class_label] if s is None else [cfg.num_classes, class_label], np.int32)   # (null, class)
    n, C = len(labels), cfg.in_channels

    def eps(p, z, t):
        x = jnp.broadcast_to(z.astype(compute)[None], (n, *z.shape))
        o = module.apply({"params": p}, x, jnp.broadcast_to(jnp.asarray(t, jnp.int32), (n,)), labels)
        o = o.astype(out_dtype)[:, :C]                    # eps; learned-sigma channels dropped
        return o[0] if s is None else o[0] + s * (o[1] - o[0])

    return eps


def dit_from_module(module: DiTTransformer2D, params, class_label: int, cfg_scale: float | None, timestep: int,
                    abar, prediction: str = "x0", numerics: Numerics = Numerics(), model_id: str = "dit") -> Generator:
    """The generator of an in-memory DiT and its params (arrays, or ShapeDtypeStructs for a
    program that is only compiled): what ``kind: dit`` builds after loading (also
    benchmarks/bench_dit.py on random or abstract DiT-XL/2-shaped weights)."""
    if prediction not in PREDICTIONS:
        raise SpecError("model.prediction", f"expected one of {list(PREDICTIONS)}, got {prediction!r}")
    abar = np.asarray(abar, np.float64)
    eps = dit_eps(module, class_label, cfg_scale, numerics)
    t_arr, ab_t = np.int32(timestep), float(abar[timestep])
    if prediction == "eps":
        def fn(p, z):
            return eps(p, z, t_arr)
    else:
        def fn(p, z):
            e = eps(p, z, t_arr)
            return diffusion.x0_from_eps(z.astype(e.dtype), e, ab_t)
    apply = with_remat(fn, numerics.remat)
    abstract = any(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree_util.tree_leaves(params))
    p = (jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, numerics.compute), params) if abstract
         else cast_params(params, numerics.compute))
    shape = tuple(module.config.latent_shape)
    out = jax.eval_shape(apply, p, jax.ShapeDtypeStruct(shape, numerics.dtype))
    return Generator(model_id=model_id, apply=apply, params=p, latent_shape=shape, output_shape=tuple(out.shape),
                     timestep=int(timestep), dtype=numerics.dtype, cfg_scale=None if cfg_scale is None else float(cfg_scale),
                     denoiser=Denoiser(eps=eps, abar=abar))


__all__ = ["DEFAULTS", "dit_eps", "dit_folder", "dit_folder_generator", "dit_from_module", "schedule"]
