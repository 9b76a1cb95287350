"""Train the zoo model ``ddpm-gmm2d``: a small DDPM on a 2-D mixture of 8 Gaussians.

    python -m geomjobs.zoo.train_ddpm_gmm2d                       # writes geomjobs/zoo/ddpm_gmm2d.{npz,json}
    python -m geomjobs.zoo.train_ddpm_gmm2d --steps 20 --out /tmp/x   # quick smoke run

Data: 8 equal-weight isotropic Gaussians, std 0.3, centred on a circle of radius 4 (first mode at
angle 0); a fixed set of 65,536 points drawn with numpy's ``default_rng(data_seed)``
(:func:`geomjobs.generators.ddpm.gmm_data`).

Schedule: T = 100 discrete steps, betas linear from 1e-3 to 0.2 (the usual 1e-4..0.02 for T = 1000,
scaled by 1000/T), so abar_{T-1} ~ 4e-5 and x_{T-1} is pure noise even for points at radius 4.

Model: :class:`geomjobs.generators.ddpm.EpsMLP` (x_t concatenated with a 32-dim sinusoidal
embedding of t, 3 hidden ReLU layers of width 128, linear output), trained with the simple
eps-prediction loss E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2 with
t ~ U{0..T-1}, Adam with a cosine-decayed learning rate, batch 512, all randomness from the seed
(runs are deterministic on a given platform).

Output: ``<out>.npz`` (flattened Flax params, '/'-joined keys, float32) and ``<out>.json``
(architecture, schedule, data, training config, loss curve, final loss, seed, command).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from geomjobs import diffusion
from geomjobs.generators.ddpm import EpsMLP, save_ddpm
from geomjobs.zoo.gmm2d import gmm_data

DEFAULT_STEPS = 12000
DEFAULT_OUT = Path(__file__).resolve().parent / "ddpm_gmm2d"

DATA = {"kind": "gmm2d", "n_modes": 8, "radius": 4.0, "std": 0.3, "weights": "equal",
        "n_points": 65536, "data_seed": 0, "generator": "numpy.random.default_rng(data_seed)"}
SCHEDULE = {"kind": "linear", "T": 100, "beta_start": 1e-3, "beta_end": 0.2}
ARCH = {"data_dim": 2, "hidden": 128, "depth": 3, "emb_dim": 32, "max_period": 100.0}


def _out_stem(out: str | None) -> Path:
    if out is None:
        return DEFAULT_OUT
    p = Path(out)
    if p.is_dir() or out.endswith(("/", "\\")):
        return p / "ddpm_gmm2d"
    return p.with_suffix("") if p.suffix in (".npz", ".json") else p


def train(steps: int, seed: int, batch: int, lr: float, log_every: int, log=print):
    import jax
    import jax.numpy as jnp
    import optax


    data = jnp.asarray(gmm_data(DATA["n_points"], DATA["data_seed"], DATA["n_modes"], DATA["radius"], DATA["std"]))
    T = SCHEDULE["T"]
    ab = diffusion.abar(SCHEDULE).astype(np.float32)       # float32, as the model trains
    sqrt_ab = jnp.asarray(np.sqrt(ab), jnp.float32)
    sqrt_1mab = jnp.asarray(np.sqrt(1.0 - ab), jnp.float32)

    module = EpsMLP(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)
    params = module.init(k_init, jnp.zeros((ARCH["data_dim"],), jnp.float32), jnp.zeros((), jnp.int32))
    sched = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.01)
    opt = optax.adam(sched)
    opt_state = opt.init(params)

    def loss_fn(p, x0, t, eps):
        xt = sqrt_ab[t, None] * x0 + sqrt_1mab[t, None] * eps
        return jnp.mean(jnp.sum((module.apply(p, xt, t) - eps) ** 2, axis=-1))

    @jax.jit
    def step(p, s, key):
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (batch,), 0, T)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, x0, t, eps)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    curve, window = [], []
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
        key, k = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, k)
        window.append(loss)
        if i % log_every == 0 or i == steps:
            mean_loss = float(np.mean(jax.device_get(window)))
            window = []
            curve.append({"step": i, "loss": round(mean_loss, 6)})
            log(f"step {i:6d}  loss {mean_loss:.5f}  ({time.perf_counter() - t0:.1f}s)")
    return module, params, curve


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m geomjobs.zoo.train_ddpm_gmm2d", description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps (default {DEFAULT_STEPS})")
    ap.add_argument("--seed", type=int, default=0, help="seed for init, batches, timesteps and noise (default 0)")
    ap.add_argument("--out", default=None,
                    help="output stem (writes STEM.npz and STEM.json) or an existing directory "
                         "(writes DIR/ddpm_gmm2d.*); default: the shipped geomjobs/zoo/ddpm_gmm2d")
    ap.add_argument("--batch", type=int, default=512, help="batch size (default 512)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate, cosine-decayed to 1%% (default 1e-3)")
    ap.add_argument("--log-every", type=int, default=500, help="print the mean loss every N steps (default 500)")
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(args_list)
    if args.steps < 1:
        ap.error("--steps must be >= 1")

    import flax
    import jax
    import optax


    module, params, curve = train(args.steps, args.seed, args.batch, args.lr, max(args.log_every, 1))
    meta = {
        "model_id": "ddpm-gmm2d",
        "description": "DDPM eps-prediction MLP on a 2-D mixture of 8 Gaussians; generator input x_t, output eps or x_0",
        "schedule": SCHEDULE,
        "data": DATA,
        "training": {"steps": args.steps, "batch": args.batch, "optimizer": "adam",
                     "lr": args.lr, "lr_schedule": "cosine decay to 1% of lr over all steps",
                     "loss": "mean over batch of ||eps - eps_theta(x_t, t)||^2, t ~ U{0..T-1}",
                     "seed": args.seed, "final_loss": curve[-1]["loss"],
                     "loss_window": f"each loss is the mean over the preceding {args.log_every} steps (fewer for the last entry)",
                     "loss_curve": curve},
        "seed": args.seed,
        "command": "python -m geomjobs.zoo.train_ddpm_gmm2d" + (" " + shlex.join(args_list) if args_list else ""),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                     "numpy": np.__version__},
        "dtype": "float32",
    }
    npz_path, json_path = save_ddpm(_out_stem(args.out), module, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
