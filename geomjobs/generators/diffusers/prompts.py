"""Prompt embeddings for ``kind: diffusers-unet``: the text encoder's last hidden states (CLIP for
SD 1.x: (n, 77, 768)), as an .npz with one array ``embeddings`` of shape (num_prompts, seq, dim),
or a Parquet file with one row per prompt (column ``embedding``: a (seq, dim) list of lists;
optional integer column ``prompt_id``). A job uses one prompt, row ``prompt_index`` of the file,
and each record's ``prompt_id`` is that row's ``prompt_id`` (the row number for an .npz). With
``cfg_scale`` s and ``negative_embedding_index`` (the unconditional / negative prompt, same
file) the output is classifier-free guided: out = out_uncond + s (out_cond - out_uncond), both in
one batch of 2.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from geomjobs.errors import SpecError


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on: ``context`` (1, seq, dim) prompt hidden states, or
    (2, seq, dim) = (negative, prompt) with ``cfg_scale``; ``prompt_id`` and ``cfg_scale`` go into records.
    ``added``: SDXL's pooled embeddings and micro-conditions in the same rows
    (:class:`geomjobs.generators.diffusers.sdxl.Added`), None for other UNets; ``rows`` and
    ``file_ids``: the file's rows used and every row's prompt id (to check the pooled file against)."""
    context: np.ndarray
    cfg_scale: float | None = None
    prompt_id: int | None = None
    added: Any = None
    rows: tuple[int, ...] = ()
    file_ids: Any = dataclasses.field(default=None, repr=False, compare=False)


def conditioning(model: dict) -> Conditioning:
    """The :class:`Conditioning` a (schema-validated) ``diffusers-unet`` section names; indices are
    checked against the file."""
    emb, prompt_ids = load_prompt_embeddings(model["prompt_embeddings"])
    idx = model.get("prompt_index", 0)
    if not 0 <= idx < len(emb):
        raise SpecError("model.prompt_index", f"expected 0..{len(emb) - 1} (the file has {len(emb)} prompts), got {idx}")
    neg = model.get("negative_embedding_index")
    if neg is not None and not 0 <= neg < len(emb):
        raise SpecError("model.negative_embedding_index", f"expected 0..{len(emb) - 1}, got {neg}")
    rows = [idx] if neg is None else [neg, idx]
    cfg = model.get("cfg_scale")
    return Conditioning(emb[rows], None if cfg is None else float(cfg), int(prompt_ids[idx]), rows=tuple(rows),
                        file_ids=prompt_ids)


def load_prompt_embeddings(path: str, key: str = "model.prompt_embeddings", ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings (num_prompts, seq, dim), prompt ids (num_prompts,)) from a file, local or remote
    (``ndim=2``: (num_prompts, dim) rows, SDXL's pooled embeddings, each a list of floats in Parquet).

    ``.parquet``: one row per prompt, a column ``embedding`` holding that prompt's (seq, dim)
    hidden states as a list of lists (``pa.list_(pa.list_(pa.float32()))``), and optionally an
    integer column ``prompt_id`` (default: the row number). Otherwise an .npz with an array
    ``embeddings``; the ids are the row numbers."""
    if path.rstrip("/").endswith(".parquet"):
        emb, ids = _parquet_prompt_embeddings(path, key, ndim)
    else:
        emb = _npz_prompt_embeddings(path, key)
        ids = np.arange(len(emb))
    if emb.ndim != ndim or not np.issubdtype(emb.dtype, np.floating) or not np.all(np.isfinite(emb)):
        want = "(num_prompts, seq, dim)" if ndim == 3 else "(num_prompts, dim)"
        raise SpecError(key, f"'{path}': expected finite float embeddings of shape {want}, got {emb.dtype} {emb.shape}")
    return emb, ids


def _parquet_prompt_embeddings(path: str, key: str, ndim: int = 3):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from geomjobs.sink.fs import open_input

    try:
        with open_input(path) as f:
            table = pq.read_table(f)
    except FileNotFoundError:
        raise SpecError(key, f"prompt embedding file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"'{path}' is not a readable Parquet file ({type(e).__name__}: {e})") from None
    row = "one (seq, dim) list of lists" if ndim == 3 else "one list of floats"
    if "embedding" not in table.column_names:
        raise SpecError(key, f"'{path}' has no column 'embedding' ({row} per prompt); "
                             f"found {table.column_names}")
    col = table.column("embedding")
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise SpecError(key, f"'{path}': column 'embedding' must hold {'lists of lists (seq, dim)' if ndim == 3 else 'lists'}, "
                             f"got {col.type}")
    rows = col.to_pylist()
    try:
        emb = np.asarray(rows, np.float32)
    except (ValueError, TypeError):
        raise SpecError(key, f"'{path}': every row of 'embedding' must have the same "
                             f"{'(seq, dim) shape' if ndim == 3 else 'length'}") from None
    if "prompt_id" in table.column_names:
        ids = table.column("prompt_id").to_pylist()
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise SpecError(key, f"'{path}': column 'prompt_id' must hold integers, got {table.column('prompt_id').type}")
        ids = np.asarray(ids, np.int64)
    else:
        ids = np.arange(len(rows))
    return emb, ids


def _npz_prompt_embeddings(path: str, key: str) -> np.ndarray:
    from geomjobs.sink.fs import open_input

    try:
        with open_input(path) as f:
            data = dict(np.load(f, allow_pickle=False))
    except FileNotFoundError:
        raise SpecError(key, f"prompt embedding file '{path}' does not exist") from None
    except Exception as e:  # noqa: BLE001
        raise SpecError(key, f"'{path}' is not a readable .npz ({type(e).__name__}: {e})") from None
    if "embeddings" not in data:
        raise SpecError(key, f"'{path}' has no array 'embeddings' (one row per prompt); found {sorted(data)}")
    return data["embeddings"]
