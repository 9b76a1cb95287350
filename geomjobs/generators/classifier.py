"""``classifier-digits``: a small classifier of scikit-learn's 8x8 digits, the project's own quality
and embedding network for digit images (no aesthetic predictor or Inception network can be had
offline).

Model (:class:`DigitsMLP`): image (8, 8) in [0, 1], flattened to 64 -> Dense 256 -> ReLU ->
Dense 128 -> ReLU (the *features*, 128-d) -> Dense 10 (the logits). Trained on the training
split of :func:`geomjobs.zoo.digits.digits_split` (1437 images) by
``python -m geomjobs.zoo.train_classifier_digits``; its held-out accuracy is in the card
(``classifier_digits.json``).

Public API (images are (..., 8, 8) floats in [0, 1], the digits' own scale; a diffusion model's
[-1, 1] samples are mapped with :func:`from_signed` first):

    load_classifier(name_or_path="classifier-digits") -> Classifier   (.probs, .features, .logits)
    classifier_probs(images)       softmax probabilities (..., 10)
    classifier_features(images)    penultimate features (..., 128)
    quality(images)                mean max-probability (the quality score)

The free functions load the shipped weights on every call; a caller that scores many batches
holds a :class:`Classifier` instead.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.generators.checkpoint import save_pair
from geomjobs.generators.diffusion_zoo import load_flax_pair

ZOO_FILES = {"classifier-digits": "classifier_digits"}
ARCH_KEYS = ("image_shape", "hidden", "num_classes")
_WHAT, _SCRIPT = "classifier", "geomjobs.zoo.train_classifier_digits"


class DigitsMLP(nn.Module):
    """image (..., *image_shape) -> (logits (..., num_classes), features (..., hidden[-1]))."""
    image_shape: tuple = (8, 8)
    hidden: tuple = (256, 128)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        nd = len(self.image_shape)
        h = jnp.reshape(jnp.asarray(x, jnp.float32), x.shape[: x.ndim - nd] + (-1,))
        for width in self.hidden:
            h = nn.relu(nn.Dense(width, param_dtype=jnp.float32)(h))
        return nn.Dense(self.num_classes, param_dtype=jnp.float32)(h), h


def module_from_config(arch: dict) -> DigitsMLP:
    return DigitsMLP(image_shape=tuple(int(s) for s in arch["image_shape"]),
                     hidden=tuple(int(h) for h in arch["hidden"]), num_classes=int(arch["num_classes"]))


def module_config(module: DigitsMLP) -> dict:
    return {"name": "DigitsMLP", "activation": "relu", "image_shape": list(module.image_shape),
            "hidden": list(module.hidden), "num_classes": module.num_classes,
            "features": f"the last hidden layer after its ReLU ({module.hidden[-1]}-d)"}


def init_params(module: DigitsMLP, key) -> Any:
    return module.init(key, jnp.zeros(module.image_shape, jnp.float32))


def from_signed(x):
    """[-1, 1] pixels (a diffusion model's data scale) -> [0, 1], clipped."""
    return np.clip((np.asarray(x, np.float32) + 1.0) / 2.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Classifier:
    module: DigitsMLP
    params: Any
    meta: dict

    @functools.cached_property
    def _apply(self):
        return jax.jit(self.module.apply)

    def _out(self, images):
        return self._apply(self.params, jnp.asarray(np.asarray(images, np.float32)))

    def logits(self, images) -> np.ndarray:
        return np.asarray(self._out(images)[0])

    def probs(self, images) -> np.ndarray:
        return np.asarray(jax.nn.softmax(self._out(images)[0], axis=-1))

    def features(self, images) -> np.ndarray:
        return np.asarray(self._out(images)[1])

    def quality(self, images) -> float:
        """Mean over images of the largest class probability."""
        return float(np.mean(np.max(self.probs(images), axis=-1)))


def load_classifier(path_or_name="classifier-digits") -> Classifier:
    """The classifier of a zoo name or a path to a .npz/.json pair (or their stem)."""
    return Classifier(*load_flax_pair(path_or_name, ZOO_FILES, {"architecture": ARCH_KEYS}, module_from_config, init_params,
                                      what=_WHAT, script=_SCRIPT))


def save_classifier(stem, module: DigitsMLP, params, meta: dict) -> tuple[Path, Path]:
    return save_pair(stem, params, {**meta, "architecture": module_config(module)})


def classifier_probs(images) -> np.ndarray:
    """Softmax class probabilities (..., 10) of the shipped classifier for images (..., 8, 8) in [0, 1]."""
    return load_classifier().probs(images)


def classifier_features(images) -> np.ndarray:
    """Penultimate features (..., 128) of the shipped classifier for images (..., 8, 8) in [0, 1]."""
    return load_classifier().features(images)


def quality(images) -> float:
    """Mean max-probability of the shipped classifier over images (n, 8, 8) in [0, 1]."""
    return load_classifier().quality(images)
