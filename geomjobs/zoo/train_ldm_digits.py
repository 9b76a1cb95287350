"""Train the zoo model ``ldm-digits``: a latent diffusion model on the ``vae-digits`` encoder's latents.

    python -m geomjobs.zoo.train_ldm_digits                          # writes geomjobs/zoo/ldm_digits.{npz,json}
    python -m geomjobs.zoo.train_ldm_digits --steps 50 --samples 200 --out /tmp/x   # quick smoke run

Data: the posterior means mu(x) in R^8 of the shipped ``vae-digits`` encoder for the 1437 training
digits of :func:`geomjobs.zoo.digits.digits_split`, unscaled (scaling factor 1.0: their measured
std is ~0.96, see :mod:`geomjobs.generators.ldm`).

Schedule: linear betas 1e-4..0.02, T = 1000. Model: :class:`geomjobs.generators.ddpm.EpsMLP`
(data_dim 8, 3 hidden ReLU layers of 256, 64-d sinusoidal timestep embedding, max period 1000).
Loss: E ||eps - eps_theta(z_t, t)||^2 (sum over the 8 dimensions, mean over the batch),
t ~ U{0..T-1}; Adam, cosine-decayed learning rate, batch 256 with replacement; the shipped weights
are an EMA (``--ema``) of the iterates. All randomness from --seed.

Card quality figures (:mod:`geomjobs.zoo.quality`): ``--samples`` latents by deterministic
DDIM-50 from noise ``default_rng([seed, i])``, decoded by the ``vae-digits`` decoder, clipped to
[0, 1] and scored by ``classifier-digits`` against the held-out digits; beside them the same
figures for the VAE's own reconstructions of the held-out digits (the ceiling a perfect latent
model reaches through this decoder).
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
from geomjobs.generators.classifier import load_classifier
from geomjobs.generators.ddpm import EpsMLP, module_config
from geomjobs.generators.ldm import init_params, load_ldm
from geomjobs.generators.vae import BetaVAE, load_vae
from geomjobs.zoo.digits import digits_images, digits_split
from geomjobs.zoo.quality import data_reference, ddim_samples, image_quality, sample_figures
from geomjobs.zoo.train_classifier_digits import DATA, out_stem
from geomjobs.zoo.train_dit_digits import SAMPLER
from geomjobs.zoo.training import card_common, diffusion_cli, diffusion_step, parse_cli, run_steps

DEFAULT_STEPS = 20000
DEFAULT_OUT = Path(__file__).resolve().parent / "ldm_digits"
SCHEDULE = {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}
ARCH = {"data_dim": 8, "hidden": 256, "depth": 3, "emb_dim": 64, "max_period": 1000.0}


def digit_latents():
    """(train latents (1437, 8), the VAE module and params, train images, held-out images) in [0, 1]."""
    import jax.numpy as jnp


    vae, vparams, _ = load_vae("vae-digits")
    images = digits_images()
    tr, te = digits_split(DATA)
    mu, _ = vae.apply(vparams, jnp.asarray(images[tr]), method=BetaVAE.encode)
    return np.asarray(mu, np.float32), (vae, vparams), images[tr], images[te]


def train(steps: int, seed: int, batch: int, lr: float, ema: float, log_every: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax


    z, *_ = digit_latents()
    data = jnp.asarray(z)
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
    return module, ema_params, curve, wall, z


def measure_quality(module, params, meta: dict, counts, seed: int, steps: int) -> dict:
    """The card's ``quality`` section: DDIM latents decoded by vae-digits, scored against the held-out digits."""
    import jax
    import jax.numpy as jnp


    clf = load_classifier()
    _, (vae, vparams), train_x, held_x = digit_latents()

    def decode(z):
        return np.clip(np.asarray(jax.jit(lambda z: vae.apply(vparams, z, method=BetaVAE.decode))(jnp.asarray(z))), 0.0, 1.0)

    recon = decode(vae.apply(vparams, jnp.asarray(held_x), method=BetaVAE.encode)[0])
    den = Denoiser(eps=lambda p, z, t: module.apply(p, z, t), abar=diffusion.abar(meta["schedule"]))
    z0 = ddim_samples(den, params, seed, max(counts), (module.data_dim,), steps)
    return {"classifier": "classifier-digits", "seed": seed, "noise": "sample i: numpy default_rng([seed, i]).standard_normal(8)",
            "sampler": {**SAMPLER, "steps": steps}, "postprocess": "vae-digits decoder, clipped to [0, 1]",
            "data": data_reference(clf, train_x, held_x),
            "vae_reconstructions_heldout": image_quality(clf, recon, held_x),
            "samples": sample_figures(clf, decode(z0), held_x, sorted(counts)),
            "latent_moments": {"sample_mean_abs_max": round(float(np.abs(z0.mean(0)).max()), 4),
                               "sample_std": np.round(z0.std(0), 4).tolist()},
            "figures": "confidence = mean max-probability; fd_to_reference = Frechet distance of classifier features "
                       "to the held-out digits; vendi_features = cosine-kernel Vendi (q = 1) of the features"}


def main(argv=None) -> int:

    ap = diffusion_cli("geomjobs.zoo.train_ldm_digits", __doc__, {
        "steps": DEFAULT_STEPS, "out": "geomjobs/zoo/ldm_digits", "batch": 256, "log_every": 1000,
        "lr_help": "peak Adam learning rate, cosine-decayed to 2%% (default 1e-3)"})
    args, args_list = parse_cli(ap, argv)


    stem = out_stem(args.out, DEFAULT_OUT)
    if args.rescore:
        module, params, meta = load_ldm(stem)
    else:
        module, params, curve, wall, z = train(args.steps, args.seed, args.batch, args.lr, args.ema, max(args.log_every, 1))
        common = card_common("geomjobs.zoo.train_ldm_digits", args, args_list, curve, wall, params)
        meta = {
            "model_id": "ldm-digits",
            "description": "latent diffusion (eps-prediction ReLU MLP) on the vae-digits encoder's posterior means; "
                           "generator = the denoiser at `timestep` (default 0), z_t (8,) -> x0_hat (default) or eps; "
                           "generated z_0 decode with vae-digits",
            "latent_shape": [8],
            "latent": {"autoencoder": "vae-digits", "encoding": "posterior mean mu(x) of each training digit",
                       "scaling_factor": 1.0, "measured_std": np.round(z.std(0), 4).tolist(),
                       "measured_mean": np.round(z.mean(0), 4).tolist(),
                       "why_unscaled": "the means already have ~unit std; with scaling 1.0 a generated z_0 is a vae-digits "
                                       "latent as it stands (no division before the decoder)"},
            "data": {**DATA, "trained_on": "the training split only"},
            "schedule": SCHEDULE,
            "prediction": "eps",
            **common,
            "training": {**common["training"], "optimizer": "adam", "lr_schedule": "cosine decay to 2% of lr",
                         "ema": args.ema, "shipped_weights": "the EMA of the iterates",
                         "loss": "mean over batch of ||eps - eps_theta(z_t, t)||^2, t ~ U{0..T-1}"},
            "architecture": module_config(module),
        }
        save_pair(stem, params, meta)              # the weights are safe before the scoring
    t0 = time.perf_counter()
    meta["quality"] = q = measure_quality(module, params, meta, sorted({200, args.samples}), meta["seed"], SAMPLER["steps"])
    q["wall_time_s"] = round(time.perf_counter() - t0, 1)
    q["scored_by"] = "python -m geomjobs.zoo.train_ldm_digits" + (" " + shlex.join(args_list) if args_list else "")
    big = q["samples"][str(args.samples)]
    print(f"{args.samples} DDIM-{SAMPLER['steps']} samples: confidence {big['confidence']:.4f} (held-out digits "
          f"{q['data']['heldout_confidence']:.4f}, VAE reconstructions {q['vae_reconstructions_heldout']['confidence']:.4f}); "
          f"FD to held-out {big['fd_to_reference']:.3f} (held-out vs train {q['data']['fd_heldout_train']:.3f}, "
          f"reconstructions {q['vae_reconstructions_heldout']['fd_to_reference']:.3f}); classes {big['class_counts']}")
    npz_path, json_path = save_pair(stem, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
