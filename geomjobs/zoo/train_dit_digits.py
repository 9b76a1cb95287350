"""Train the zoo model ``dit-digits``: a small DiT (adaLN-Zero, GELU) in pixel space on scikit-learn's digits.

    python -m geomjobs.zoo.train_dit_digits                          # writes geomjobs/zoo/dit_digits.{npz,json}
    python -m geomjobs.zoo.train_dit_digits --steps 20 --samples 200 --out /tmp/x   # quick smoke run

Data: the 1437 training digits of :func:`geomjobs.zoo.digits.digits_split` (the 360 held-out ones
are only used to score samples), pixels raw / 16 * 2 - 1 in [-1, 1], shape (8, 8).

Schedule: linear betas 1e-4..0.02, T = 1000 (:mod:`geomjobs.diffusion`). Model:
:class:`geomjobs.generators.dit.DiT` (patch 2 -> 16 tokens, D = 64, 4 blocks, 4 heads, MLP ratio 4).
Loss: E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2 (mean over pixels),
t ~ U{0..T-1}; Adam, linear warm-up then cosine decay, batch 128 with replacement; the shipped
weights are an exponential moving average (``--ema``) of the iterates. All randomness from --seed.

Card quality figures (:mod:`geomjobs.zoo.quality`): ``--samples`` samples (sample i's noise from
``default_rng([seed, i])``) by deterministic DDIM-50, mapped back to [0, 1], scored by
``classifier-digits`` against the held-out digits; reported at each count in ``counts`` (the
tests recompute the smallest one from the shipped weights).
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Denoiser
from geomjobs.generators.classifier import from_signed, load_classifier
from geomjobs.generators.dit import DiT, init_params, load_dit, save_dit
from geomjobs.zoo.digits import digits_images, digits_split
from geomjobs.zoo.quality import data_reference, ddim_samples, sample_figures
from geomjobs.zoo.train_classifier_digits import DATA, out_stem
from geomjobs.zoo.training import card_common, diffusion_cli, diffusion_step, parse_cli, run_steps

DEFAULT_STEPS = 3600
DEFAULT_OUT = Path(__file__).resolve().parent / "dit_digits"
SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
ARCH = {"image_size": 8, "patch": 2, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 4, "freq_dim": 256}
SAMPLER = {"kind": "ddim", "steps": 50, "eta": 0.0, "spacing": "leading, t_k = k * (T // steps)", "final_abar": 1.0}
DATA_SCALE = "x / 16 * 2 - 1 (pixels in [-1, 1]); samples are mapped back by (x + 1) / 2, clipped to [0, 1]"


def digits_pm1():
    """(train, held-out) digits in [-1, 1], (n, 8, 8) float32."""

    images = digits_images()
    tr, te = digits_split(DATA)
    return images[tr] * 2 - 1, images[te] * 2 - 1


def train(steps: int, seed: int, batch: int, lr: float, warmup: int, ema: float, log_every: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax


    data = jnp.asarray(digits_pm1()[0])
    abar = diffusion.abar(SCHEDULE)
    sqrt_ab, sqrt_1mab = jnp.asarray(np.sqrt(abar), jnp.float32), jnp.asarray(np.sqrt(1 - abar), jnp.float32)
    T = SCHEDULE["T"]
    module = DiT(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init_params(module, k_init)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(warmup, max(steps - 1, 1)), max(steps, 2), end_value=0.05 * lr)
    opt = optax.adam(sched)
    opt_state = opt.init(params)

    def loss_fn(p, x0, t, eps):
        xt = sqrt_ab[t, None, None] * x0 + sqrt_1mab[t, None, None] * eps
        return jnp.mean((module.apply(p, xt, t) - eps) ** 2)

    step = diffusion_step(loss_fn, opt, data, batch, T, ema)
    (_, ema_params, _), curve, wall = run_steps(step, (params, params, opt_state), key, steps, log_every, log)
    return module, ema_params, curve, wall


def measure_quality(module, params, meta: dict, counts, seed: int, steps: int) -> dict:
    """The card's ``quality`` section: DDIM samples of the DiT scored against the held-out digits."""

    clf = load_classifier()
    train_x, held_x = (from_signed(a) for a in digits_pm1())
    den = Denoiser(eps=lambda p, x, t: module.apply(p, x, t), abar=diffusion.abar(meta["schedule"]))
    x0 = ddim_samples(den, params, seed, max(counts), (module.image_size, module.image_size), steps)
    return {"classifier": "classifier-digits", "seed": seed, "noise": "sample i: numpy default_rng([seed, i]).standard_normal((8, 8))",
            "sampler": {**SAMPLER, "steps": steps}, "postprocess": "(x + 1) / 2 clipped to [0, 1]",
            "data": data_reference(clf, train_x, held_x),
            "samples": sample_figures(clf, from_signed(x0), held_x, sorted(counts)),
            "figures": "confidence = mean max-probability; fd_to_reference = Frechet distance of classifier features "
                       "to the held-out digits; vendi_features = cosine-kernel Vendi (q = 1) of the features"}


def main(argv=None) -> int:

    ap = diffusion_cli("geomjobs.zoo.train_dit_digits", __doc__, {
        "steps": DEFAULT_STEPS, "out": "geomjobs/zoo/dit_digits", "batch": 128, "log_every": 250,
        "lr_help": "peak Adam learning rate (default 1e-3)"})
    ap.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    args, args_list = parse_cli(ap, argv)


    stem = out_stem(args.out, DEFAULT_OUT)
    if args.rescore:
        module, params, meta = load_dit(stem)
    else:
        module, params, curve, wall = train(args.steps, args.seed, args.batch, args.lr, args.warmup, args.ema, max(args.log_every, 1))
        common = card_common("geomjobs.zoo.train_dit_digits", args, args_list, curve, wall, params)
        meta = {
            "model_id": "dit-digits",
            "description": "DiT (adaLN-Zero, GELU) eps-prediction in pixel space on scikit-learn's 8x8 digits; generator = the "
                           "denoiser at `timestep` (default 0), x_t (8, 8) -> x0_hat (default) or eps",
            "latent_shape": [8, 8],
            "data": {**DATA, "diffusion_scale": DATA_SCALE, "trained_on": "the training split only"},
            "schedule": SCHEDULE,
            "prediction": "eps",
            **common,
            "training": {**common["training"], "optimizer": "adam",
                         "lr_schedule": f"linear warm-up over {args.warmup} steps, cosine decay to 5% of lr",
                         "ema": args.ema, "shipped_weights": "the EMA of the iterates",
                         "loss": "mean over batch and pixels of (eps - eps_theta(x_t, t))^2, t ~ U{0..T-1}"},
        }
        save_dit(stem, module, params, meta)       # the weights are safe before the (minutes of) scoring
    t0 = time.perf_counter()
    meta["quality"] = measure_quality(module, params, meta, sorted({200, args.samples}), meta["seed"], SAMPLER["steps"])
    meta["quality"]["wall_time_s"] = round(time.perf_counter() - t0, 1)
    meta["quality"]["scored_by"] = "python -m geomjobs.zoo.train_dit_digits" + (" " + shlex.join(args_list) if args_list else "")
    q = meta["quality"]
    big = q["samples"][str(args.samples)]
    print(f"{args.samples} DDIM-{SAMPLER['steps']} samples: confidence {big['confidence']:.4f} "
          f"(held-out digits {q['data']['heldout_confidence']:.4f}); FD to held-out {big['fd_to_reference']:.3f} "
          f"(held-out vs train {q['data']['fd_heldout_train']:.3f}); classes {big['class_counts']}")
    npz_path, json_path = save_dit(stem, module, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
