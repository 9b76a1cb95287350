"""The quality figures of the zoo diffusion models' cards (``dit-digits``, ``ldm-digits``), computed
by their training scripts and recomputed from the shipped weights by the tests.

Samples (:func:`ddim_samples`): sample i's initial noise is
``numpy.random.default_rng([seed, i]).standard_normal(shape)`` (float32), denoised by
deterministic DDIM (eta = 0) of :mod:`geomjobs.sampling` over ``steps`` timesteps (diffusers'
"leading" spacing, the last step to abar = 1, i.e. the x0 prediction at t = 0). Samples are drawn in chunks of
:data:`CHUNK` so that the first m samples of a larger run are computed exactly as an m-sample run
(m a multiple of CHUNK).

Figures (:func:`image_quality`), for images in [0, 1] scored by ``classifier-digits``:
confidence = mean max-probability; FD = Frechet distance of the classifier's penultimate
features (:func:`geomjobs.metrics.frechet_distance`); Vendi = cosine-kernel Vendi score (q = 1)
of the same features (:func:`geomjobs.metrics.vendi_score`); the predicted-class histogram.

Nearest-real-digit ratio (:func:`nn_ratio`, given the training digits): the median over the
samples of the Euclidean pixel distance ([0, 1] pixels, 64-d) to the nearest training digit,
divided by the same median for the held-out digits. Held-out digits score 1 by construction; a
model whose samples sit as close to the training digits as fresh real digits do scores about 1;
blurry or blended samples score above 1 (pixel averages of two held-out digits of different
classes score 1.41; of the same class, 1.0: the ratio does not see such blends), a model that
copies its training digits scores below 1 (the training digits themselves: 0).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from geomjobs import sampling
from geomjobs.metrics import frechet_distance, vendi_score

CHUNK = 200


def ddim_samples(denoiser, params, seed: int, n: int, shape, steps: int = 50) -> np.ndarray:
    """Samples 0..n-1 (n, *shape), float32, by deterministic DDIM (:mod:`geomjobs.sampling`) from
    sample i's noise ``default_rng([seed, i])``, drawn in chunks of :data:`CHUNK`."""
    run = sampling.batch_sampler(denoiser, sampling.Sampler("ddim", steps, 0.0))
    out = []
    for lo in range(0, n, CHUNK):
        noise = np.stack([sampling.initial_noise(seed, i, shape) for i in range(lo, min(n, lo + CHUNK))])
        out.append(np.asarray(run(params, jnp.asarray(noise, jnp.float32))))
    return np.concatenate(out)


def image_quality(clf, images, reference=None) -> dict:
    """Confidence, class histogram and feature Vendi of ``images`` (n, 8, 8) in [0, 1]; with
    ``reference`` images also the Frechet distance of their features."""
    probs, feats = clf.probs(images), clf.features(images)
    out = {"n": int(len(images)), "confidence": round(float(np.mean(probs.max(-1))), 6),
           "class_counts": np.bincount(probs.argmax(-1), minlength=probs.shape[-1]).tolist(),
           "vendi_features": round(vendi_score(feats, 1), 4)}
    if reference is not None:
        out["fd_to_reference"] = round(frechet_distance(feats, clf.features(reference)), 4)
    return out


def nearest_distances(x, ref) -> np.ndarray:
    """Euclidean distance (float64) of each image of ``x`` (n, ...) to its nearest image of ``ref``."""
    a = np.asarray(x, np.float64).reshape(len(x), -1)
    b = np.asarray(ref, np.float64).reshape(len(ref), -1)
    d2 = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def nn_ratio(images01, train, heldout) -> float:
    """median nearest-training-digit distance of ``images01`` / that of the ``heldout`` digits (module doc)."""
    return float(np.median(nearest_distances(images01, train)) / np.median(nearest_distances(heldout, train)))


def data_reference(clf, train, heldout) -> dict:
    """The real digits' figures: held-out confidence and Vendi, FD(held-out, train) (the floor)."""
    ref = image_quality(clf, heldout, train)
    return {"heldout_confidence": ref["confidence"], "heldout_vendi_features": ref["vendi_features"],
            "fd_heldout_train": ref["fd_to_reference"], "n_heldout": len(heldout), "n_train": len(train)}


def sample_figures(clf, images01, heldout, counts, train=None) -> dict:
    """{count: image_quality of the first ``count`` samples against the held-out digits}, with
    ``train`` (the training digits) also their :func:`nn_ratio` as ``nn_ratio``."""
    out = {}
    for m in counts:
        out[str(m)] = image_quality(clf, images01[:m], heldout)
        if train is not None:
            out[str(m)]["nn_ratio"] = round(nn_ratio(images01[:m], train, heldout), 4)
    return out
