"""``kind: diffusers-unet``: G(z) = the UNet's output at ``timestep`` for latent z = x_t,
conditioned on one prompt embedding (``prediction: eps``), or x0_hat = (z - sqrt(1 - abar_t) eps)
/ sqrt(abar_t) (``prediction: x0``).

abar_t comes from the scheduler config (the pipeline's ``scheduler/scheduler_config.json`` next to
``subfolder``, or the spec's ``scheduler_config``); a ``v_prediction`` or ``sample`` model's output
is converted to eps / x0 by the identities of :mod:`geomjobs.diffusion`. Prompts and guidance:
:mod:`geomjobs.generators.diffusers.prompts`. Latents are channels-first ``(C, h, w)``.

The generator is built in two steps that can be used on their own: :func:`unet_output` (the
network's raw, guided output as a function of (params, z)) and :func:`as_prediction` (that output
as eps or x0).

Where the schedule is known (a scheduler config), the generator also carries its
:class:`~geomjobs.generators.base.Denoiser` (:func:`unet_denoiser`): the guided eps at any traced
timestep with the same prompt conditioning and params, what samplers and trajectories evaluate.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.errors import SpecError
from geomjobs.generators.base import Denoiser, Generator
from geomjobs.generators.diffusers.folders import (
    Numerics,
    cast_params,
    compute_dtype,
    default_model_id,
    import_diffusers,
    latent_shape,
    load_pretrained,
    model_folder,
    shape_of,
    with_remat,
)
from geomjobs.generators.diffusers.prompts import Conditioning, conditioning
from geomjobs.generators.diffusers.sdxl import added_conditioning

PREDICTIONS = ("eps", "x0")
OUTPUT_KINDS = ("epsilon", "v_prediction", "sample")   # diffusers' prediction_type


@dataclasses.dataclass(frozen=True)
class Target:
    """What G computes: the UNet at ``timestep`` on latents of ``latent_shape``, whose raw output
    is ``output_kind`` (the scheduler's prediction_type), returned as ``prediction`` (eps | x0);
    ``abar_t`` (needed unless both are eps)."""
    latent_shape: tuple[int, ...]
    timestep: int
    abar_t: float | None = None
    output_kind: str = "epsilon"
    prediction: str = "eps"
    abar: Any = None               # the whole schedule (T,) float64 where known: the Denoiser needs it


def unet_generator(model: dict, dtype=jnp.float32) -> Generator:
    """``kind: diffusers-unet`` (keys: path, subfolder, dtype, timestep, prediction, prompt_embeddings,
    prompt_index, cfg_scale, negative_embedding_index, scheduler_config, latent_shape,
    model_id, remat, memory_efficient_attention; for SDXL's text_time UNets pooled_embeddings and the micro-conditions of
    :mod:`.sdxl`), from a schema-validated section."""
    diffusers = import_diffusers("diffusers-unet")
    numerics = Numerics(compute_dtype(model), dtype, model.get("remat", "none"))
    cond = conditioning(model)
    folder = model_folder(model, "UNet2DConditionModel", "unet", optional=("scheduler",))
    unet, params, _ = load_pretrained(diffusers.FlaxUNet2DConditionModel, folder, numerics.compute)
    if model.get("memory_efficient_attention"):   # diffusers' chunked attention: the same function, less memory
        unet = unet.clone(use_memory_efficient_attention=True)
    cfg = unet.config
    if cond.context.shape[-1] != cfg.cross_attention_dim:
        raise SpecError("model.prompt_embeddings", f"embeddings have dim {cond.context.shape[-1]}, the UNet's "
                                                   f"cross_attention_dim is {cfg.cross_attention_dim}")
    shape = latent_shape(model, (cfg.in_channels, cfg.sample_size, cfg.sample_size), cfg.in_channels)
    added = added_conditioning(model, cfg, list(cond.rows), cond.file_ids, shape)
    cond = dataclasses.replace(cond, added=added)
    target = _target(model, folder[0], shape)
    return unet_from_module(unet, params, cond, target, numerics, default_model_id(model, "diffusers-unet"))


def _target(model: dict, root: str, shape) -> Target:
    """The :class:`Target` of a spec: timestep, prediction and the scheduler's abar_t and prediction_type."""
    t, prediction = model["timestep"], model.get("prediction", "eps")
    sched = _scheduler_config(model, root)
    kind = (sched or {}).get("prediction_type", "epsilon")
    if kind not in OUTPUT_KINDS:
        raise SpecError("model.scheduler_config", f"prediction_type {kind!r} is not supported; expected epsilon, "
                                                  "v_prediction or sample")
    if sched is None:
        if prediction == "x0" or kind != "epsilon":
            raise SpecError("model.scheduler_config", "prediction x0 needs the noise schedule: give scheduler_config "
                                                      "or a pipeline folder with scheduler/scheduler_config.json")
        return Target(shape, t, None, kind, prediction)
    try:
        ab = diffusion.abar(betas=diffusion.diffusers_betas(sched))
    except (ValueError, TypeError) as e:
        raise SpecError("model.scheduler_config", str(e)) from None
    if t >= len(ab):
        raise SpecError("model.timestep", f"expected 0..{len(ab) - 1} (the scheduler has {len(ab)} steps), got {t}")
    return Target(shape, t, float(ab[t]), kind, prediction, ab)


def _scheduler_config(model: dict, root: str) -> dict | None:
    if model.get("scheduler_config") is not None:
        return dict(model["scheduler_config"])
    p = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    return None


def unet_from_module(unet, params, cond: Conditioning, target: Target, numerics: Numerics = Numerics(),
                     model_id: str = "diffusers-unet") -> Generator:
    """The generator of an in-memory FlaxUNet2DConditionModel and its params: what ``kind:
    diffusers-unet`` builds after loading (also used by benchmarks/bench_sd.py on random SD-shaped
    weights)."""
    out_fn, p = unet_output(unet, params, cond, target.timestep, numerics)
    apply = with_remat(as_prediction(out_fn, target.abar_t, target.output_kind, target.prediction), numerics.remat)
    shape = tuple(target.latent_shape)
    den = None
    if target.abar is not None:
        den = unet_denoiser(unet_output_at(unet, cond, numerics), target.abar, target.output_kind, numerics.out)
    return Generator(model_id=model_id, apply=apply, params=p, latent_shape=shape,
                     output_shape=shape_of(apply, p, shape, numerics.dtype), timestep=target.timestep,
                     dtype=numerics.dtype, prompt_id=cond.prompt_id, cfg_scale=cond.cfg_scale, denoiser=den)


def unet_output(unet, params, cond: Conditioning, timestep: int, numerics: Numerics = Numerics()):
    """(out(p, z), p): the UNet's raw output at ``timestep`` for ONE latent z (C, h, w), in
    ``numerics.out``, classifier-free guided when ``cond.cfg_scale`` is set, and its params
    (UNet weights cast to ``numerics.compute`` plus the context; for SDXL also ``text_embeds`` in
    ``numerics.compute`` and ``time_ids`` in float32, sizes in pixels held exactly)."""
    p = {"unet": cast_params(params, numerics.compute), "context": jnp.asarray(cond.context, numerics.compute)}
    if cond.added is not None:
        p["text_embeds"] = jnp.asarray(cond.added.text_embeds, numerics.compute)
        p["time_ids"] = jnp.asarray(cond.added.time_ids, jnp.float32)
    out_t = unet_output_at(unet, cond, numerics)
    return (lambda p, z: out_t(p, z, timestep)), p


def unet_output_at(unet, cond: Conditioning, numerics: Numerics = Numerics()):
    """out(p, z, t): the UNet's raw, guided output (as :func:`unet_output`'s) at timestep t, which
    may be traced; p as :func:`unet_output` returns it."""
    compute, out_dtype = numerics.compute, numerics.out
    n_ctx = len(cond.context)
    s = None if cond.cfg_scale is None else float(cond.cfg_scale)

    def out(p, z, t):
        x = jnp.broadcast_to(z.astype(compute)[None], (n_ctx, *z.shape))   # (1 or 2, C, h, w): NCHW
        added = {"text_embeds": p["text_embeds"], "time_ids": p["time_ids"]} if "text_embeds" in p else None
        o = unet.apply({"params": p["unet"]}, x, t, p["context"], added).sample.astype(out_dtype)
        return o[0] if s is None else o[0] + s * (o[1] - o[0])   # (uncond, cond) -> guided

    return out


def unet_denoiser(out_t, abar, output_kind: str = "epsilon", out_dtype=jnp.float32) -> Denoiser:
    """The :class:`Denoiser` of a raw output ``out_t(p, z, t)`` of kind epsilon | v_prediction |
    sample: eps(p, x_t, t) by the identities of :mod:`geomjobs.diffusion` with abar_t from the
    schedule (rounded to ``out_dtype``), t an integer timestep (traced or not)."""
    if output_kind not in OUTPUT_KINDS:
        raise ValueError(f"expected output_kind in {OUTPUT_KINDS}, got {output_kind!r}")
    ab64 = np.asarray(abar, np.float64)
    to_eps = {"epsilon": None, "v_prediction": diffusion.eps_from_v, "sample": diffusion.eps_from_x0}[output_kind]

    def eps(p, z, t):
        o = out_t(p, z, t)
        if to_eps is None:
            return o
        return to_eps(z.astype(o.dtype), o, jnp.asarray(ab64, out_dtype)[t])

    return Denoiser(eps=eps, abar=ab64)


def as_prediction(out_fn, abar: float | None, output_kind: str = "epsilon", prediction: str = "eps"):
    """``out_fn(p, z)`` (a network output of kind epsilon | v_prediction | sample at a timestep
    with abar_t = ``abar``) as a function (p, z) -> eps or x0 (``prediction``)."""
    if output_kind not in OUTPUT_KINDS or prediction not in PREDICTIONS:
        raise ValueError(f"expected output_kind in {OUTPUT_KINDS} and prediction in {PREDICTIONS}, "
                         f"got {output_kind!r}, {prediction!r}")
    if output_kind == "epsilon" and prediction == "eps":
        return out_fn
    if abar is None:
        raise ValueError(f"a {output_kind} output as {prediction} needs abar_t")
    convert = {("epsilon", "x0"): lambda z, o: diffusion.x0_from_eps(z, o, abar),
               ("v_prediction", "eps"): lambda z, o: diffusion.eps_from_v(z, o, abar),
               ("v_prediction", "x0"): lambda z, o: diffusion.x0_from_v(z, o, abar),
               ("sample", "eps"): lambda z, o: diffusion.eps_from_x0(z, o, abar),
               ("sample", "x0"): lambda z, o: o}[(output_kind, prediction)]

    def fn(p, z):
        o = out_fn(p, z)
        return convert(z.astype(o.dtype), o)

    return fn
