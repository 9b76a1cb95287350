"""Train the zoo model ``vae-digits``: a beta-VAE (beta = 4) on scikit-learn's handwritten digits.

    python -m geomjobs.zoo.train_vae_digits                          # writes geomjobs/zoo/vae_digits.{npz,json}
    python -m geomjobs.zoo.train_vae_digits --steps 50 --out /tmp/x  # quick smoke run

Data: ``sklearn.datasets.load_digits`` (1797 8x8 images, values 0..16, shipped with scikit-learn),
scaled to [0, 1] by /16. Held out: 360 images (the first 360 of numpy's
``default_rng(0).permutation(1797)``, :func:`geomjobs.generators.vae.digits_split`); training uses
the other 1437 only.

Model and objective: :class:`geomjobs.generators.vae.BetaVAE` (MLP 64-256-128-(8, 8) encoder,
8-128-256-64 decoder, ReLU, linear output), loss per image
||x - dec(z)||^2 / (2 * 0.1^2) + 4 * KL(q(z|x) || N(0, I)), reparameterised z, Adam with a cosine-decayed
learning rate, batch 128 drawn with replacement; all randomness from --seed (deterministic on a
given platform). About 10-20 s on 2 CPU cores.

Evaluation, written to the .json and printed: held-out and train reconstruction MSE per pixel of
decode(encoder mean), against predicting the mean training image and against the same
architecture at its (untrained) initialisation.

Output: ``<out>.npz`` (flattened Flax params, '/'-joined keys, float32) and ``<out>.json``.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from geomjobs.generators.vae import BetaVAE, init_params, save_vae
from geomjobs.zoo.digits import digits_images, digits_split, loss_terms, reconstruct

DEFAULT_STEPS = 6000
DEFAULT_OUT = Path(__file__).resolve().parent / "vae_digits"

DATA = {"kind": "sklearn-digits", "loader": "sklearn.datasets.load_digits", "n_images": 1797,
        "image_shape": [8, 8], "scale": "raw value / 16 (0..16 -> [0, 1])",
        "split_seed": 0, "n_test": 360,
        "split": "held out = first n_test of numpy.random.default_rng(split_seed).permutation(n_images)"}
OBJECTIVE = {"beta": 4.0, "likelihood": "gaussian", "obs_std": 0.1,
             "loss": "mean over batch of ||x - dec(z)||^2 / (2 obs_std^2) + beta * KL(N(mu, sigma^2) || N(0, I)), "
                     "z = mu + sigma * eps"}
ARCH = {"image_shape": (8, 8), "latent_dim": 8, "enc_hidden": (256, 128), "dec_hidden": (128, 256)}


def _out_stem(out: str | None) -> Path:
    if out is None:
        return DEFAULT_OUT
    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        return p / "vae_digits"
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def evaluate(module, params, init_params, train_x, test_x) -> dict:

    mse = lambda p, x: float(np.mean((reconstruct(module, p, x) - x) ** 2))  # noqa: E731
    mean_img = train_x.mean(axis=0)
    return {"heldout_mse": round(mse(params, test_x), 6), "train_mse": round(mse(params, train_x), 6),
            "heldout_mse_mean_image": round(float(np.mean((test_x - mean_img) ** 2)), 6),
            "heldout_mse_untrained": round(mse(init_params, test_x), 6),
            "mse": "mean over images and pixels of (decode(encoder mean(x)) - x)^2, x in [0, 1]; "
                   "baselines: the mean training image, and the same architecture at its seed's initialisation"}


def train(steps: int, seed: int, batch: int, lr: float, log_every: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax


    images = digits_images()
    train_idx, test_idx = digits_split(DATA)
    data = jnp.asarray(images[train_idx])
    beta, obs_std = OBJECTIVE["beta"], OBJECTIVE["obs_std"]

    module = BetaVAE(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init_params(module, k_init)
    params0 = params
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    opt_state = opt.init(params)

    def loss_fn(p, x, eps):
        rec, kl = loss_terms(module, p, x, eps, obs_std)
        return jnp.mean(rec + beta * kl), (jnp.mean(rec), jnp.mean(kl))

    @jax.jit
    def step(p, s, key):
        k_idx, k_eps = jax.random.split(key)
        x = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
        eps = jax.random.normal(k_eps, (batch, module.latent_dim), jnp.float32)
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, eps)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss, aux

    curve, window = [], []
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        key, k = jax.random.split(key)
        params, opt_state, loss, aux = step(params, opt_state, k)
        window.append((loss, *aux))
        if i % log_every == 0 or i == steps:
            m = np.mean(np.asarray(jax.device_get(window), np.float64), axis=0)
            window = []
            curve.append({"step": i, "loss": round(float(m[0]), 4), "rec": round(float(m[1]), 4), "kl": round(float(m[2]), 4)})
            log(f"step {i:6d}  loss {m[0]:9.3f}  (rec {m[1]:8.3f}  kl {m[2]:7.3f})  ({time.perf_counter() - t0:.1f}s)")
    return module, params, params0, curve, images[train_idx], images[test_idx]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geomjobs.zoo.train_vae_digits", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--seed", type=int, default=0, help="seed for init, batches and reparameterisation noise (default 0)")
    ap.add_argument("--out", default=None,
                    help="output stem (writes STEM.npz and STEM.json) or an existing directory "
                         "(writes DIR/vae_digits.*); default: the shipped geomjobs/zoo/vae_digits")
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak Adam learning rate, cosine-decayed to 5%% (default 2e-3)")
    ap.add_argument("--log-every", type=int, default=500, help="print the mean loss every N steps (default 500)")
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(args_list)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    import flax
    import jax
    import optax
    import sklearn


    module, params, params0, curve, train_x, test_x = train(args.steps, args.seed, args.batch, args.lr,
                                                            max(args.log_every, 1))
    ev = evaluate(module, params, params0, train_x, test_x)
    print(f"held-out reconstruction MSE {ev['heldout_mse']:.5f} (train {ev['train_mse']:.5f}); "
          f"mean image {ev['heldout_mse_mean_image']:.5f}; untrained {ev['heldout_mse_untrained']:.5f}")
    meta = {
        "model_id": "vae-digits",
        "description": "beta-VAE (MLP, ReLU) on scikit-learn's 8x8 handwritten digits; generator = decoder, "
                       "latent (8,) -> image (8, 8); the encoder mean encodes images for latents kind 'images'",
        "objective": OBJECTIVE,
        "data": DATA,
        "training": {"steps": args.steps, "batch": args.batch, "optimizer": "adam", "lr": args.lr,
                     "lr_schedule": "cosine decay to 5% of lr over all steps",
                     "seed": args.seed, "final_loss": curve[-1]["loss"],
                     "loss_window": f"each entry is the mean over the preceding {args.log_every} steps "
                                    f"(fewer for the last entry); rec and kl are the two terms before weighting",
                     "loss_curve": curve},
        "evaluation": ev,
        "seed": args.seed,
        "command": "python -m geomjobs.zoo.train_vae_digits" + (" " + shlex.join(args_list) if args_list else ""),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__, "scikit-learn": sklearn.__version__},
        "dtype": "float32",
    }
    npz_path, json_path = save_vae(_out_stem(args.out), module, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
