"""SDXL's added conditioning for ``kind: diffusers-unet``: a UNet whose config has
``addition_embed_type: text_time`` (SDXL base and refiner) adds to the timestep embedding an
embedding of the pooled text embedding and of the micro-conditions ``time_ids``
(FlaxUNet2DConditionModel's ``added_cond_kwargs``: ``text_embeds`` and ``time_ids``).

Spec keys (docs/models.md):

- ``pooled_embeddings`` (required for such a UNet, refused for any other): a file of pooled text
  embeddings, one row per prompt, in the rows of ``prompt_embeddings`` (SDXL base: text encoder
  2's projected pooled output, 1280-d; the sequence file then holds the two encoders' hidden
  states concatenated, 768 + 1280 = 2048-d). An .npz with an array ``embeddings`` of shape
  (num_prompts, dim), or a Parquet file with a column ``embedding`` (a list of floats per row)
  and optionally ``prompt_id`` (which, unless it is the row numbers, must equal the sequence file's). Its width must be
  ``projection_class_embeddings_input_dim - n * addition_time_embed_dim`` of the config, n the
  number of micro-conditions.
- the micro-conditions, in pixels, as the SDXL pipelines build them: ``original_size`` [h, w] and
  ``target_size`` [h, w] (both default to the latent's h, w times :data:`VAE_SCALE` = 8, the SDXL
  VAE's downsampling: [1024, 1024] for a 4 x 128 x 128 latent), ``crops_coords_top_left``
  [top, left] (default [0, 0]). time_ids = original_size + crops_coords_top_left + target_size
  (6 values, SDXL base).
- the refiner (5 micro-conditions: diffusers' Flax class tells them apart by
  ``5 * addition_time_embed_dim + cross_attention_dim == projection_class_embeddings_input_dim``)
  takes ``aesthetic_score`` (default 6.0) in place of ``target_size``, and the negative branch of
  classifier-free guidance ``negative_aesthetic_score`` (default 2.5), the pipeline's defaults.

With classifier-free guidance the negative branch takes the pooled row ``negative_embedding_index``
(SDXL's "zeroed" negative is then a row of zeros in both files) and the same size conditions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from geomjobs.errors import SpecError

VAE_SCALE = 8          # the SDXL VAE's downsampling: pixels per latent cell
SIZE_KEYS = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score")
ADDED_KEYS = ("pooled_embeddings",) + SIZE_KEYS


@dataclasses.dataclass(frozen=True)
class Added:
    """The added conditioning of one prompt: ``text_embeds`` (1 or 2, dim) pooled embeddings and
    ``time_ids`` (1 or 2, n) micro-conditions, (negative, prompt) rows with classifier-free guidance."""
    text_embeds: np.ndarray
    time_ids: np.ndarray


def micro_conditions(cfg) -> int:
    """The number of micro-conditions of a text_time UNet config: 5 for a refiner, else 6 (the
    rule of diffusers' FlaxUNet2DConditionModel.init_weights, which sizes the added embedding by it)."""
    refiner = 5 * cfg.addition_time_embed_dim + cfg.cross_attention_dim == cfg.projection_class_embeddings_input_dim
    return 5 if refiner else 6


def pooled_width(cfg) -> int:
    """The pooled embedding width a text_time UNet config takes."""
    return int(cfg.projection_class_embeddings_input_dim - micro_conditions(cfg) * cfg.addition_time_embed_dim)


def added_conditioning(model: dict, cfg, rows: list[int], prompt_ids: np.ndarray, latent_shape,
                       prefix: str = "model") -> Added | None:
    """The :class:`Added` conditioning a (schema-validated) ``diffusers-unet`` section gives a UNet
    of config ``cfg`` (None for a UNet without ``text_time``), checked against the config, the
    prompt file's ids (``prompt_ids``) and the rows it uses (``rows``: [prompt] or [negative, prompt])."""
    if getattr(cfg, "addition_embed_type", None) != "text_time":
        given = [k for k in ADDED_KEYS if model.get(k) is not None]
        if given:
            raise SpecError(f"{prefix}.{given[0]}", f"the UNet's config has addition_embed_type "
                                                    f"{getattr(cfg, 'addition_embed_type', None)!r}, not 'text_time' "
                                                    f"(SDXL): it takes no {given[0]}")
        return None
    if model.get("pooled_embeddings") is None:
        raise SpecError(f"{prefix}.pooled_embeddings", "the UNet's config has addition_embed_type 'text_time' (SDXL): "
                                                       "give the pooled text embeddings file (num_prompts, "
                                                       f"{pooled_width(cfg)}) in the rows of prompt_embeddings")
    pooled = load_pooled(model["pooled_embeddings"], f"{prefix}.pooled_embeddings", prompt_ids)
    if pooled.shape[1] != pooled_width(cfg):
        raise SpecError(f"{prefix}.pooled_embeddings",
                        f"'{model['pooled_embeddings']}': pooled embeddings have dim {pooled.shape[1]}; the UNet takes "
                        f"{pooled_width(cfg)} (projection_class_embeddings_input_dim "
                        f"{cfg.projection_class_embeddings_input_dim} - {micro_conditions(cfg)} micro-conditions x "
                        f"addition_time_embed_dim {cfg.addition_time_embed_dim})")
    ids = time_ids(model, cfg, latent_shape, negative=len(rows) == 2, prefix=prefix)
    return Added(pooled[rows], ids)


def time_ids(model: dict, cfg, latent_shape, negative: bool = False, prefix: str = "model") -> np.ndarray:
    """(1 or 2, n) float32 micro-conditions (module doc); with ``negative`` the negative branch's row first."""
    h, w = (int(s) * VAE_SCALE for s in latent_shape[1:])
    orig = _pair(model, "original_size", (h, w), 1, prefix)
    crop = _pair(model, "crops_coords_top_left", (0, 0), 0, prefix)
    if micro_conditions(cfg) == 6:
        for k in ("aesthetic_score", "negative_aesthetic_score"):
            if model.get(k) is not None:
                raise SpecError(f"{prefix}.{k}", f"{k} conditions an SDXL refiner (5 micro-conditions); this UNet "
                                                 "takes original_size, crops_coords_top_left and target_size")
        row = [*orig, *crop, *_pair(model, "target_size", (h, w), 1, prefix)]
        rows = [row, row] if negative else [row]
    else:
        if model.get("target_size") is not None:
            raise SpecError(f"{prefix}.target_size", "an SDXL refiner (5 micro-conditions) takes aesthetic_score "
                                                     "in place of target_size")
        score = float(model.get("aesthetic_score", 6.0))
        neg = float(model.get("negative_aesthetic_score", 2.5))
        rows = [[*orig, *crop, neg], [*orig, *crop, score]] if negative else [[*orig, *crop, score]]
    return np.asarray(rows, np.float32)


def _pair(model: dict, k: str, default, lo: int, prefix: str) -> tuple[int, int]:
    v = model.get(k)
    if v is None:
        return tuple(default)
    if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= lo for x in v):
        raise SpecError(f"{prefix}.{k}", f"expected two integers >= {lo} (pixels, height first), got {v!r}")
    return int(v[0]), int(v[1])


def load_pooled(path: str, key: str, prompt_ids: np.ndarray | None = None) -> np.ndarray:
    """(num_prompts, dim) pooled embeddings (module doc), checked against the sequence file's
    prompt ids when given (same number of rows, same ids)."""
    from geomjobs.generators.diffusers.prompts import load_prompt_embeddings

    emb, ids = load_prompt_embeddings(path, key, ndim=2)
    if prompt_ids is not None:
        if len(emb) != len(prompt_ids):
            raise SpecError(key, f"'{path}' has {len(emb)} pooled rows; prompt_embeddings has {len(prompt_ids)} "
                                 "prompts (one pooled row per prompt, in the same order)")
        implicit = np.array_equal(ids, np.arange(len(ids)))   # an .npz, or a Parquet file without prompt_id
        if not implicit and not np.array_equal(np.asarray(ids), np.asarray(prompt_ids)):
            bad = int(np.flatnonzero(np.asarray(ids) != np.asarray(prompt_ids))[0])
            raise SpecError(key, f"'{path}': row {bad} has prompt_id {int(ids[bad])}; prompt_embeddings' row {bad} "
                                 f"has {int(prompt_ids[bad])}")
    return emb
