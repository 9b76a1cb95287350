"""The data the zoo VAE (``vae-digits``) is trained on, its loss and its reconstructions.

Data: ``sklearn.datasets.load_digits`` (1797 grey-scale 8x8 images, integer values 0..16, shipped
inside scikit-learn, nothing downloaded), scaled to [0, 1] by dividing by 16. A fixed held-out
split (:func:`digits_split`: a permutation from numpy's ``default_rng(split_seed)``, the first
``n_test`` indices held out) is used only to report reconstruction error. The objective is
written out in :mod:`geomjobs.generators.vae`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from geomjobs.generators.vae import BetaVAE


def digits_images() -> np.ndarray:
    """The 1797 scikit-learn digits as float32 images (1797, 8, 8) in [0, 1] (raw value / 16)."""
    from sklearn.datasets import load_digits

    return (np.asarray(load_digits().images, np.float64) / 16.0).astype(np.float32)


def digits_split(data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices) into :func:`digits_images`, both sorted.

    A permutation of 0..n_images-1 from ``numpy.random.default_rng(split_seed)``; its first
    ``n_test`` entries are held out. ``data`` is the ``data`` section of the model's metadata
    (keys ``n_images``, ``split_seed``, ``n_test``); default: the shipped split (seed 0, 360 of 1797).
    """
    data = data or {"n_images": 1797, "split_seed": 0, "n_test": 360}
    perm = np.random.default_rng(int(data["split_seed"])).permutation(int(data["n_images"]))
    n_test = int(data["n_test"])
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def loss_terms(module: BetaVAE, params, x, eps, obs_std: float):
    """Per-image (reconstruction term ||x - dec(z)||^2 / (2 obs_std^2), KL) for a batch x (m, *image_shape)."""
    xh, mu, logvar = module.apply(params, x, eps)
    axes = tuple(range(1, x.ndim))
    rec = jnp.sum((x - xh) ** 2, axis=axes) / (2.0 * obs_std ** 2)
    kl = 0.5 * jnp.sum(mu ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
    return rec, kl


def reconstruct(module: BetaVAE, params, x) -> np.ndarray:
    """decode(encoder mean of x) for images x (..., *image_shape), as numpy."""
    mu, _ = module.apply(params, jnp.asarray(x, jnp.float32), method=BetaVAE.encode)
    return np.asarray(module.apply(params, mu, method=BetaVAE.decode))
