"""``geomjobs reward evaluate BASELINE GUIDED [GUIDED ...] --out DIR`` (docs/reward.md).

The baseline is an unguided ``sampled`` dataset; each guided dataset is the same job with
``latents.guidance`` (same model, sampler, seed and count), so record i of every dataset starts
from the same noise. Records are paired by ``sample_id``; a pair counts when both records are
``ok``.

Level sets: 10 equal-width bins of the baseline's psi range [min, max] (the top edge falls in bin
9; :func:`geomjobs.analysis.stats.level_set_index`, the notebooks' rule). A guided sample belongs
to the level set of its *baseline partner* (the same seed before guidance), so a bin compares the
same initial noises with and without guidance.

Per (dataset, level set): ``count``, ``psi_mean`` (the dataset's own ``local_scaling`` column,
i.e. psi recomputed by the service at the guided sample, never the reward's prediction),
``psi_ci95`` (1.96 * sample std / sqrt(count), the normal-approximation half-width; null below
2 samples), ``vendi`` (order 1, cosine kernel, :func:`geomjobs.metrics.vendi_score`) and
``quality`` (mean classifier confidence) of the bin's decoded samples.

Features and quality come from the generated latent ``z`` (the jobs need ``save_latent: true``):

- ``ldm-digits`` latents are decoded by the ``vae-digits`` decoder (clipped to [0, 1]),
  ``dit-digits`` samples are images in [-1, 1] (mapped to [0, 1]); both are scored by
  ``classifier-digits``: its penultimate features for Vendi and the Frechet distance to the
  held-out digits, its mean max-probability for quality (``features = "classifier-digits"``).
- any other model (e.g. Stable Diffusion): no offline quality network exists, so ``quality`` and
  the Frechet distance are null and Vendi is taken on the flattened latents
  (``features = "latent"``).

Outputs in DIR: ``levelsets.parquet`` (the columns above plus ``dataset``, ``guidance_scale``,
``level_set``, ``bin_low``, ``bin_high``, ``features``), ``datasets.parquet`` (one row per dataset
over all its samples, with ``fd_heldout``), and ``levelsets.png`` (psi / Vendi / quality per level
set, baseline vs each scale).
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from geomjobs.analysis.plots import save_png
from geomjobs.analysis.stats import level_set_index
from geomjobs.errors import SpecError
from geomjobs.generators import build_generator
from geomjobs.generators.classifier import from_signed, load_classifier
from geomjobs.metrics import frechet_distance, vendi_score
from geomjobs.sink.dataset import Dataset
from geomjobs.zoo.digits import digits_images, digits_split

N_LEVEL_SETS = 10
Z95 = 1.959963984540054            # the normal 97.5 % quantile
COLUMNS = ("dataset", "guidance_scale", "level_set", "bin_low", "bin_high", "count", "psi_mean", "psi_ci95",
           "vendi", "quality", "features")
# latents.model keys that must agree between the baseline and a guided dataset (they decide the
# initial noise and the sampler path; only guidance may differ)
PAIRED_KEYS = ("kind", "model", "sampler", "seed", "count")


# --------------------------------------------------------------------------------------------
# reading and pairing
# --------------------------------------------------------------------------------------------

def _load(uri: str) -> dict[str, Any]:
    """{uri, spec, table (pandas, sorted by sample_id)} of a geomjobs dataset, or SpecError(uri)."""

    ds = Dataset(uri)
    if not ds.exists():
        raise SpecError(uri, "not a geomjobs dataset (no _geomjobs/job.json)")
    spec = ds.spec()
    lat = spec.get("latents", {})
    if lat.get("kind") != "sampled":
        raise SpecError(uri, f"expected a dataset of latents kind 'sampled', got {lat.get('kind')!r}")
    df = ds.read_table().to_pandas()
    if len(df) == 0:
        raise SpecError(uri, "the dataset has no committed records")
    if "z" not in df.columns or df["z"].isna().all():
        raise SpecError(uri, "the records have no `z` column: run the job with latents.save_latent: true")
    return {"uri": uri, "spec": spec, "df": df.sort_values("sample_id").reset_index(drop=True)}


def _scale_of(d: dict) -> float:
    g = d["spec"]["latents"].get("guidance")
    return float(g["scale"]) if g else 0.0


def _check_pairs(base: dict, other: dict) -> None:
    """Same sample ids and the same sampling job but for guidance, else SpecError(other's uri)."""
    bl, gl = base["spec"]["latents"], other["spec"]["latents"]
    for k in PAIRED_KEYS:
        if bl.get(k) != gl.get(k):
            what = "seeds differ" if k == "seed" else f"latents.{k} differs"
            raise SpecError(other["uri"], f"does not pair up with the baseline {base['uri']}: {what} "
                                          f"({bl.get(k)!r} vs {gl.get(k)!r}); only latents.guidance may differ")
    a, b = base["df"]["sample_id"].to_numpy(), other["df"]["sample_id"].to_numpy()
    if len(a) != len(b) or not np.array_equal(a, b):
        only_a, only_b = np.setdiff1d(a, b), np.setdiff1d(b, a)
        raise SpecError(other["uri"], f"sample ids do not pair up with the baseline {base['uri']}: "
                                      f"{len(only_a)} only in the baseline (e.g. {only_a[:3].tolist()}), "
                                      f"{len(only_b)} only here (e.g. {only_b[:3].tolist()})")
    sa, sb = base["df"].get("noise_seed"), other["df"].get("noise_seed")
    if sa is not None and sb is not None and not np.array_equal(sa.to_numpy(), sb.to_numpy()):
        raise SpecError(other["uri"], "seeds differ from the baseline's (noise_seed column)")


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------

class _Scorer:
    """Images and classifier scores of a dataset's generated latents (module doc)."""

    def __init__(self):
        self._clf = self._vae = self._held = None

    @property
    def clf(self):
        if self._clf is None:

            self._clf = load_classifier()
        return self._clf

    def heldout_features(self) -> np.ndarray:
        if self._held is None:

            _, held = digits_split()
            self._held = self.clf.features(digits_images()[held])
        return self._held

    def images(self, spec: dict, z: np.ndarray) -> np.ndarray | None:
        """(n, 8, 8) digit images in [0, 1], or None when the model is not a digits model."""
        model = spec["latents"]["model"]
        name = model.get("name") if model.get("kind") == "zoo" else None
        if name == "ldm-digits":
            import jax

            if self._vae is None:

                dec = build_generator({"kind": "zoo", "name": "vae-digits"})
                self._vae = (jax.jit(jax.vmap(lambda v: dec.apply(dec.params, v))), dec.params)
            out = np.asarray(self._vae[0](z.reshape(len(z), 8).astype(np.float32)))
            return np.clip(out.reshape(len(z), 8, 8), 0.0, 1.0)
        if name == "dit-digits":

            return from_signed(z.reshape(len(z), 8, 8))
        return None

    def score(self, spec: dict, z: np.ndarray) -> dict:
        """{features (n, f), confidence (n,) or None, kind}."""
        img = self.images(spec, z)
        if img is None:
            return {"features": z.reshape(len(z), -1), "confidence": None, "kind": "latent"}
        return {"features": self.clf.features(img), "confidence": self.clf.probs(img).max(-1), "kind": "classifier-digits"}


def _stats(psi: np.ndarray, feats: np.ndarray, conf: np.ndarray | None) -> dict:
    n = len(psi)
    if n == 0:
        return {"count": 0, "psi_mean": None, "psi_ci95": None, "vendi": None, "quality": None}
    ci = Z95 * float(np.std(psi, ddof=1)) / math.sqrt(n) if n >= 2 else None
    return {"count": n, "psi_mean": float(np.mean(psi)), "psi_ci95": ci, "vendi": vendi_score(feats, 1),
            "quality": None if conf is None else float(np.mean(conf))}


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------

def evaluate(baseline: str, guided: list[str], out: str) -> dict:
    """Write DIR/levelsets.parquet, DIR/datasets.parquet and DIR/levelsets.png; returns
    {"levelsets": DataFrame, "datasets": DataFrame, "png": path}. Bad input raises SpecError
    (naming the dataset URI) before anything is written."""
    import pandas as pd

    base = _load(baseline)
    others = [_load(u) for u in guided]
    for o in others:
        _check_pairs(base, o)
    bdf = base["df"]
    ok = (bdf["status"] == "ok").to_numpy().copy()
    for o in others:
        ok &= (o["df"]["status"] == "ok").to_numpy()
    if not ok.any():
        raise SpecError(baseline, "no sample is ok in the baseline and every guided dataset")
    bins, edges = level_set_index(bdf["local_scaling"].to_numpy()[ok], N_LEVEL_SETS)
    scorer = _Scorer()
    rows, summary = [], []
    for d in [base, *others]:
        df = d["df"][ok]
        psi = df["local_scaling"].to_numpy(np.float64)
        z = np.stack([np.asarray(v, np.float64) for v in df["z"]])
        sc = scorer.score(d["spec"], z)
        scale = _scale_of(d)
        for b in range(N_LEVEL_SETS):
            m = bins == b
            rows.append({"dataset": d["uri"], "guidance_scale": scale, "level_set": b, "bin_low": float(edges[b]),
                         "bin_high": float(edges[b + 1]),
                         **_stats(psi[m], sc["features"][m], None if sc["confidence"] is None else sc["confidence"][m]),
                         "features": sc["kind"]})
        fd = (frechet_distance(sc["features"], scorer.heldout_features()) if sc["kind"] == "classifier-digits"
              and len(psi) >= 2 else None)
        summary.append({"dataset": d["uri"], "guidance_scale": scale, **_stats(psi, sc["features"], sc["confidence"]),
                        "fd_heldout": fd, "features": sc["kind"]})
    levels = pd.DataFrame(rows, columns=list(COLUMNS))
    levels["level_set"] = levels["level_set"].astype("int64")
    levels["count"] = levels["count"].astype("int64")
    datasets = pd.DataFrame(summary)
    os.makedirs(out, exist_ok=True)
    levels.to_parquet(os.path.join(out, "levelsets.parquet"), index=False)
    datasets.to_parquet(os.path.join(out, "datasets.parquet"), index=False)
    png = os.path.join(out, "levelsets.png")
    plot(levels, png)
    return {"levelsets": levels, "datasets": datasets, "png": png}


def plot(levels, png: str) -> None:
    """Three panels (psi mean with its 95 % CI / Vendi / quality per level set), one line per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for (uri, scale), g in levels.groupby(["dataset", "guidance_scale"], sort=False):
        g = g.sort_values("level_set")
        label = f"scale {scale:g}" + (" (baseline)" if uri == levels["dataset"].iloc[0] else "")
        x = g["level_set"].to_numpy()
        ci = g["psi_ci95"].astype(float).fillna(0.0).to_numpy()
        axes[0].errorbar(x, g["psi_mean"].astype(float), yerr=ci, marker="o", ms=3, capsize=2, label=label)
        axes[1].plot(x, g["vendi"].astype(float), marker="o", ms=3, label=label)
        axes[2].plot(x, g["quality"].astype(float), marker="o", ms=3, label=label)
    feats = levels["features"].iloc[0]
    for ax, title in zip(axes, ["mean psi (recomputed), 95% CI", f"Vendi (q=1, {feats} features)",
                                "quality (classifier confidence)"]):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("level set of the baseline's psi (10 equal-width bins)", fontsize=8)
        ax.set_xticks(range(N_LEVEL_SETS))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, png, dpi=120)


__all__ = ["COLUMNS", "N_LEVEL_SETS", "evaluate", "plot"]
