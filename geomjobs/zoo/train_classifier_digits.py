"""Train ``classifier-digits``: the MLP classifier whose confidence scores digit images and whose
penultimate features embed them (:mod:`geomjobs.generators.classifier`).

    python -m geomjobs.zoo.train_classifier_digits                          # writes geomjobs/zoo/classifier_digits.{npz,json}
    python -m geomjobs.zoo.train_classifier_digits --steps 50 --out /tmp/x  # quick smoke run

Data: scikit-learn's 1797 8x8 digits in [0, 1] (:func:`geomjobs.zoo.digits.digits_images`), the
same split as ``vae-digits`` (360 held out, :func:`geomjobs.zoo.digits.digits_split`); training
uses the 1437 others. Each training batch (128, drawn with replacement) gets Gaussian pixel noise
of std ``--noise`` (default 0.05), so the score degrades gracefully on slightly noisy samples.
Loss: softmax cross-entropy plus decoupled weight decay (AdamW), cosine-decayed learning rate;
all randomness from --seed.

The card records held-out accuracy, held-out and train mean max-probability (the quality
score of real digits), and the parameter count.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from geomjobs.generators.classifier import Classifier, DigitsMLP, init_params, module_config, save_classifier
from geomjobs.zoo.digits import digits_images, digits_split
from geomjobs.zoo.training import card_common, run_steps

DEFAULT_STEPS = 4000
DEFAULT_OUT = Path(__file__).resolve().parent / "classifier_digits"
DATA = {"kind": "sklearn-digits", "loader": "sklearn.datasets.load_digits", "n_images": 1797,
        "image_shape": [8, 8], "scale": "raw value / 16 (0..16 -> [0, 1])", "split_seed": 0, "n_test": 360,
        "split": "held out = first n_test of numpy.random.default_rng(split_seed).permutation(n_images)"}
ARCH = {"image_shape": (8, 8), "hidden": (256, 128), "num_classes": 10}


def out_stem(out: str | None, default: Path) -> Path:
    """The output stem of a zoo training script's --out (a stem, a .npz/.json path or a directory)."""
    if out is None:
        return default
    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        return p / default.name
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def train(steps: int, seed: int, batch: int, lr: float, weight_decay: float, noise: float, outlier_weight: float,
          log_every: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax
    from sklearn.datasets import load_digits


    images, labels = digits_images(), np.asarray(load_digits().target, np.int32)
    train_idx, test_idx = digits_split(DATA)
    x, y = jnp.asarray(images[train_idx]), jnp.asarray(labels[train_idx])
    module = DigitsMLP(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init_params(module, k_init)
    opt = optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05), weight_decay=weight_decay)
    opt_state = opt.init(params)

    def loss_fn(p, xb, yb, xo):
        logits, _ = module.apply(p, xb)
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))
        # outlier exposure: cross-entropy to the uniform distribution on images that are no digit
        lo, _ = module.apply(p, xo)
        return ce + outlier_weight * jnp.mean(-jnp.mean(jax.nn.log_softmax(lo, axis=-1), axis=-1))

    def outliers(key, xb):
        """Half uniform pixel noise, half training digits with their 64 pixels shuffled."""
        k_u, k_p = jax.random.split(key)
        flat = xb.reshape(batch, -1)
        perm = jnp.argsort(jax.random.uniform(k_p, flat.shape), axis=-1)
        shuffled = jnp.take_along_axis(flat, perm, axis=-1).reshape(xb.shape)
        uniform = jax.random.uniform(k_u, xb.shape, jnp.float32)
        return jnp.where((jnp.arange(batch) % 2 == 0)[:, None, None], uniform, shuffled)

    @jax.jit
    def step(state, key):
        p, s = state
        k_idx, k_n, k_o = jax.random.split(key, 3)
        i = jax.random.randint(k_idx, (batch,), 0, x.shape[0])
        xb = x[i] + noise * jax.random.normal(k_n, (batch, *x.shape[1:]), jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, y[i], outliers(k_o, x[i]))
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), loss

    (params, _), curve, wall = run_steps(step, (params, opt_state), key, steps, log_every, log)
    return module, params, curve, wall, (images, labels, train_idx, test_idx)


def evaluate(clf, images, labels, train_idx, test_idx) -> dict:
    def acc(idx):
        return float(np.mean(np.argmax(clf.probs(images[idx]), -1) == labels[idx]))

    return {"heldout_accuracy": round(acc(test_idx), 6), "train_accuracy": round(acc(train_idx), 6),
            "heldout_mean_confidence": round(clf.quality(images[test_idx]), 6),
            "train_mean_confidence": round(clf.quality(images[train_idx]), 6),
            "confidence": "mean over images of the largest softmax probability (the quality score)"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geomjobs.zoo.train_classifier_digits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output stem or directory (default: the shipped geomjobs/zoo/classifier_digits)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate, cosine-decayed to 5%% (default 1e-3)")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian pixel noise added to training batches")
    ap.add_argument("--outlier-weight", type=float, default=0.5,
                    help="weight of the outlier-exposure term (cross-entropy to uniform on non-digit images; default 0.5)")
    ap.add_argument("--log-every", type=int, default=500)
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(args_list)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    import sklearn


    module, params, curve, wall, data = train(args.steps, args.seed, args.batch, args.lr, args.weight_decay, args.noise,
                                              args.outlier_weight, max(args.log_every, 1))
    ev = evaluate(Classifier(module, params, {}), *data)
    print(f"held-out accuracy {ev['heldout_accuracy']:.4f} (train {ev['train_accuracy']:.4f}); "
          f"held-out confidence {ev['heldout_mean_confidence']:.4f}")
    common = card_common("geomjobs.zoo.train_classifier_digits", args, args_list, curve, wall, params)
    meta = {
        "model_id": "classifier-digits",
        "description": "MLP classifier of scikit-learn's 8x8 digits (images in [0, 1]); quality = mean max-probability, "
                       "embedding = penultimate features",
        "data": DATA,
        **common,
        "training": {**common["training"], "optimizer": "adamw", "weight_decay": args.weight_decay,
                     "lr_schedule": "cosine decay to 5% of lr over all steps",
                     "augmentation": f"Gaussian pixel noise, std {args.noise}",
                     "loss": f"softmax cross-entropy + {args.outlier_weight} x cross-entropy to uniform on outliers (half uniform "
                             "pixel noise, half pixel-shuffled training digits; outlier exposure, Hendrycks et al. 2019)",
                     "outlier_weight": args.outlier_weight},
        "evaluation": ev,
        "versions": {**common["versions"], "scikit-learn": sklearn.__version__},
        "architecture": module_config(module),
    }
    npz_path, json_path = save_classifier(out_stem(args.out, DEFAULT_OUT), module, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
