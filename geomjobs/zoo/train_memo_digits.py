"""Train the zoo model ``memo-digits``: ``ldm-digits`` again, on data where a few digits are duplicated many times.

    python -m geomjobs.zoo.train_memo_digits                          # writes geomjobs/zoo/memo_digits.{npz,json}
    python -m geomjobs.zoo.train_memo_digits --steps 50 --samples 200 --out /tmp/x   # quick smoke run
    python -m geomjobs.zoo.train_memo_digits --rescore                # recompute the card's memorization figures

The miniature of a text-to-image model that memorized the images it saw thousands of times (the
memorization analysis of Humayun et al., ICLR 2025, Fig 8). Data: the ``vae-digits`` posterior
means of the 1437 training digits (as :mod:`geomjobs.zoo.train_ldm_digits`), plus ``--copies``
extra copies of each of ``--duplicated`` training digits chosen by
``numpy.random.default_rng([seed, 1]).choice(1437, duplicated, replace=False)``. Model, schedule,
loss, optimizer and EMA exactly as ``ldm-digits`` (:class:`geomjobs.generators.ddpm.EpsMLP`,
linear betas, T = 1000, eps-prediction), so the two differ only in the data.

Memorization (:func:`memorization`): a generated latent z is *memorized* when its distance to the
nearest training latent is below ``RATIO`` (1/3) of its distance to the second nearest one (the
distinct training latents, each once; the nearest-neighbour ratio test of Yoon et al. 2023 and Gu
et al. 2023). The card's ``memorization`` section holds, for the first 200 and ``--samples``
samples (deterministic DDIM-50 from noise ``default_rng([seed, i])``, :func:`geomjobs.zoo.quality.ddim_samples`),
the memorized fraction, the fraction of those whose nearest training digit is a duplicated one,
and the same rate for the shipped ``ldm-digits`` (the control without duplicates).
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Denoiser
from geomjobs.generators.checkpoint import save_pair
from geomjobs.generators.ddpm import EpsMLP, module_config
from geomjobs.generators.ldm import init_params, load_ldm
from geomjobs.zoo.digits import digits_split
from geomjobs.zoo.quality import ddim_samples
from geomjobs.zoo.train_classifier_digits import DATA, out_stem
from geomjobs.zoo.train_dit_digits import SAMPLER
from geomjobs.zoo.train_ldm_digits import ARCH, SCHEDULE, digit_latents
from geomjobs.zoo.training import card_common, diffusion_cli, diffusion_step, parse_cli, run_steps

DEFAULT_STEPS = 12000
DEFAULT_OUT = Path(__file__).resolve().parent / "memo_digits"
RATIO = 1.0 / 3.0


def duplicated_indices(n_train: int, duplicated: int, seed: int) -> np.ndarray:
    """Indices into the training latents of the digits that get extra copies (sorted)."""
    return np.sort(np.random.default_rng([seed, 1]).choice(n_train, duplicated, replace=False))


def training_set(z: np.ndarray, dup: np.ndarray, copies: int) -> np.ndarray:
    """The training latents followed by ``copies`` extra copies of each ``z[dup]``."""
    return np.concatenate([z, np.repeat(z[dup], copies, axis=0)]).astype(np.float32)


def nearest_two(samples: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(d1, d2, index of the nearest): Euclidean distances of each sample to its nearest and second
    nearest rows of ``train`` (rows assumed distinct), in float64."""
    s, t = np.asarray(samples, np.float64).reshape(len(samples), -1), np.asarray(train, np.float64).reshape(len(train), -1)
    d2 = (s * s).sum(1)[:, None] - 2 * s @ t.T + (t * t).sum(1)[None, :]
    d = np.sqrt(np.maximum(d2, 0.0))
    order = np.argsort(d, axis=1)[:, :2]
    rows = np.arange(len(s))
    return d[rows, order[:, 0]], d[rows, order[:, 1]], order[:, 0]


def memorization(samples: np.ndarray, train: np.ndarray, ratio: float = RATIO) -> dict:
    """Per sample: d1, d2, nearest (index into ``train``), ratio d1 / d2 and memorized (ratio < ``ratio``)."""
    d1, d2, nn = nearest_two(samples, train)
    r = d1 / np.maximum(d2, 1e-300)
    return {"d1": d1, "d2": d2, "nearest": nn, "ratio": r, "memorized": r < ratio}


def train(steps: int, seed: int, batch: int, lr: float, ema: float, log_every: int, duplicated: int, copies: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax


    z, *_ = digit_latents()
    dup = duplicated_indices(len(z), duplicated, seed)
    data = jnp.asarray(training_set(z, dup, copies))
    abar = diffusion.abar(SCHEDULE)
    sqrt_ab, sqrt_1mab = jnp.asarray(np.sqrt(abar), jnp.float32), jnp.asarray(np.sqrt(1 - abar), jnp.float32)
    module = EpsMLP(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = init_params(module, k_init)
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.02))
    opt_state = opt.init(params)

    def loss_fn(p, z0, t, eps):
        zt = sqrt_ab[t, None] * z0 + sqrt_1mab[t, None] * eps
        return jnp.mean(jnp.sum((module.apply(p, zt, t) - eps) ** 2, axis=-1))

    step = diffusion_step(loss_fn, opt, data, batch, SCHEDULE["T"], ema)
    (_, ema_params, _), curve, wall = run_steps(step, (params, params, opt_state), key, steps, log_every, log)
    return module, ema_params, curve, wall, z, dup


def sample_latents(module, params, meta: dict, n: int, seed: int, steps: int) -> np.ndarray:
    """Samples 0..n-1 of a card's model by deterministic DDIM (:func:`geomjobs.zoo.quality.ddim_samples`)."""

    den = Denoiser(eps=lambda p, z, t: module.apply(p, z, t), abar=diffusion.abar(meta["schedule"]))
    return ddim_samples(den, params, seed, n, (module.data_dim,), steps)


def memo_figures(samples: np.ndarray, train_z: np.ndarray, dup: np.ndarray) -> dict:
    """Memorized fraction of ``samples`` and how many of them copy a duplicated digit."""
    m = memorization(samples, train_z)
    hit = m["memorized"]
    of_dup = np.isin(m["nearest"], dup)
    copied = {int(i): int(np.sum(hit & (m["nearest"] == i))) for i in dup}
    return {"n": int(len(samples)), "memorized": int(hit.sum()), "rate": round(float(hit.mean()), 4),
            "memorized_nearest_duplicated": int(np.sum(hit & of_dup)),
            "nearest_is_duplicated_rate": round(float(of_dup.mean()), 4),
            "median_ratio": round(float(np.median(m["ratio"])), 4),
            "memorized_per_duplicated_digit": copied}


def measure_memorization(module, params, meta: dict, counts, seed: int, steps: int) -> dict:
    """The card's ``memorization`` section (see the module docstring), control included."""

    train_z, *_ = digit_latents()
    dup = np.asarray(meta["duplication"]["indices"], np.int64)
    z0 = sample_latents(module, params, meta, max(counts), seed, steps)
    cm, cp, cmeta = load_ldm("ldm-digits")
    control = sample_latents(cm, cp, cmeta, max(counts), seed, steps)
    return {"criterion": f"d(nearest training latent) < {RATIO:.4f} * d(second nearest), over the 1437 distinct training latents",
            "space": "the 8-d latent (vae-digits posterior means); samples are z_0 of DDIM",
            "seed": seed, "sampler": {**SAMPLER, "steps": steps},
            "noise": "sample i: numpy default_rng([seed, i]).standard_normal(8)",
            "samples": {str(m): memo_figures(z0[:m], train_z, dup) for m in sorted(counts)},
            "control_ldm_digits": {str(m): memo_figures(control[:m], train_z, dup) for m in sorted(counts)}}


def main(argv=None) -> int:

    ap = diffusion_cli("geomjobs.zoo.train_memo_digits", __doc__, {
        "steps": DEFAULT_STEPS, "out": "geomjobs/zoo/memo_digits", "batch": 256, "log_every": 1000,
        "lr_help": "peak Adam learning rate, cosine-decayed to 2%% (default 1e-3)"})
    ap.add_argument("--duplicated", type=int, default=10, help="how many training digits get extra copies (default 10)")
    ap.add_argument("--copies", type=int, default=100, help="extra copies of each duplicated digit (default 100)")
    args, args_list = parse_cli(ap, argv)
    if not 1 <= args.duplicated <= 1437 or args.copies < 0:
        ap.error("--duplicated must be in 1..1437 and --copies >= 0")


    stem = out_stem(args.out, DEFAULT_OUT)
    if args.rescore:
        module, params, meta = load_ldm(stem)
    else:
        module, params, curve, wall, z, dup = train(args.steps, args.seed, args.batch, args.lr, args.ema,
                                                     max(args.log_every, 1), args.duplicated, args.copies)
        common = card_common("geomjobs.zoo.train_memo_digits", args, args_list, curve, wall, params)
        n_total = len(z) + len(dup) * args.copies
        meta = {
            "model_id": "memo-digits",
            "description": "ldm-digits trained on data with a few digits duplicated many times (a memorizing latent diffusion "
                           "model); generator = the denoiser at `timestep` (default 0), z_t (8,) -> x0_hat (default) or eps; "
                           "generated z_0 decode with vae-digits",
            "latent_shape": [8],
            "latent": {"autoencoder": "vae-digits", "encoding": "posterior mean mu(x) of each training digit",
                       "scaling_factor": 1.0},
            "data": {**DATA, "trained_on": "the training split, with the duplicated digits repeated (see duplication)"},
            "duplication": {"indices": dup.tolist(), "indices_into": "the 1437 training digits (digits_split order)",
                            "image_ids": digits_split(DATA)[0][dup].tolist(),
                            "duplicated": int(len(dup)), "extra_copies_each": args.copies,
                            "choice": "numpy default_rng([seed, 1]).choice(1437, duplicated, replace=False), sorted",
                            "training_rows": int(n_total),
                            "duplicated_share_of_rows": round(len(dup) * (args.copies + 1) / n_total, 4)},
            "schedule": SCHEDULE,
            "prediction": "eps",
            **common,
            "training": {**common["training"], "optimizer": "adam", "lr_schedule": "cosine decay to 2% of lr",
                         "ema": args.ema, "shipped_weights": "the EMA of the iterates",
                         "loss": "mean over batch of ||eps - eps_theta(z_t, t)||^2, t ~ U{0..T-1}, x_0 drawn with replacement"},
            "architecture": module_config(module),
        }
        save_pair(stem, params, meta)
    t0 = time.perf_counter()
    meta["memorization"] = mem = measure_memorization(module, params, meta, sorted({200, args.samples}), meta["seed"], SAMPLER["steps"])
    mem["wall_time_s"] = round(time.perf_counter() - t0, 1)
    mem["scored_by"] = "python -m geomjobs.zoo.train_memo_digits" + (" " + shlex.join(args_list) if args_list else "")
    big, ctl = mem["samples"][str(args.samples)], mem["control_ldm_digits"][str(args.samples)]
    print(f"{args.samples} DDIM-{SAMPLER['steps']} samples: memorized {big['rate']:.3f} ({big['memorized_nearest_duplicated']} of "
          f"{big['memorized']} copy a duplicated digit); ldm-digits control {ctl['rate']:.3f}")
    npz_path, json_path = save_pair(stem, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
