"""The optimisation loop the zoo training scripts share: jitted steps, a per-step key split from
the seed's key, the windowed loss curve the model cards record, and the EMA update."""
from __future__ import annotations

import argparse
import shlex
import sys
import time

import numpy as np


def ema_update(ema_params, params, decay):
    """decay * ema + (1 - decay) * params, leaf by leaf."""
    import jax

    return jax.tree_util.tree_map(lambda a, b: decay * a + (1 - decay) * b, ema_params, params)


def warm_ema_decay(ema: float, count):
    """The EMA decay at update number ``count`` (1, 2, ...) with a warm-up: min(ema, (1 + count) /
    (10 + count)), so that the average forgets the initial weights within a few hundred steps
    instead of keeping a share ema^count of them."""
    import jax.numpy as jnp

    return jnp.minimum(ema, (1.0 + count) / (10.0 + count))


def run_steps(step, state, key, steps: int, log_every: int, log=print, every: int = 0, callback=None):
    """Run ``state, loss = step(state, k)`` for ``steps`` steps, k split off ``key`` each step.

    Returns (state, curve, wall seconds); ``curve`` holds {"step", "loss"} every ``log_every``
    steps (and at the last), each loss the mean over the steps since the previous entry. With
    ``every`` > 0, ``callback(i, state, curve so far, training seconds so far)`` runs after each
    step i that is a multiple of ``every`` (its own time is not counted)."""
    import jax

    curve, window, t0 = [], [], time.perf_counter()
    for i in range(1, steps + 1):
        key, k = jax.random.split(key)
        state, loss = step(state, k)
        window.append(loss)
        if i % log_every == 0 or i == steps:
            m = float(np.mean(jax.device_get(window)))
            window = []
            curve.append({"step": i, "loss": round(m, 6)})
            log(f"step {i:6d}  loss {m:.5f}  ({time.perf_counter() - t0:.1f}s)", flush=True)
        if every and callback is not None and i % every == 0:
            t_cb = time.perf_counter()
            callback(i, state, list(curve), t_cb - t0)
            t0 += time.perf_counter() - t_cb
    return state, curve, time.perf_counter() - t0


def diffusion_step(loss_fn, opt, data, batch: int, T: int, ema: float, ema_warmup: bool = False):
    """A jitted eps-prediction training step on state (params, ema params, optimizer state):
    x_0 drawn with replacement from ``data``, t ~ U{0..T-1}, eps ~ N(0, I), loss_fn(p, x0, t, eps).
    With ``ema_warmup`` the EMA decay is :func:`warm_ema_decay` of the optimizer's step count
    (read from the state of ``optax.adam``'s scale_by_adam, the first element of ``opt``'s state)."""
    import jax
    import jax.numpy as jnp
    import optax

    @jax.jit
    def step(state, key):
        p, e, s = state
        k_idx, k_t, k_eps = jax.random.split(key, 3)
        x0 = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
        t = jax.random.randint(k_t, (batch,), 0, T)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        loss, g = jax.value_and_grad(loss_fn)(p, x0, t, eps)
        upd, s = opt.update(g, s, p)
        p = optax.apply_updates(p, upd)
        decay = warm_ema_decay(ema, s[0].count) if ema_warmup else ema
        return (p, ema_update(e, p, decay), s), loss

    return step


def card_common(script: str, args, args_list, curve, wall: float, params) -> dict:
    """The model-card fields every zoo training script writes: the training record's common part
    (``training``, to be extended), parameter count, seed, command, versions, dtype."""
    import flax
    import jax
    import optax

    return {
        "training": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
                     "final_loss": curve[-1]["loss"], "loss_curve": curve,
                     "loss_window": f"each loss is the mean over the preceding {args.log_every} steps (of the raw iterates)",
                     "wall_time_s": round(wall, 1), "platform": jax.default_backend()},
        "parameters": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(params))),
        "seed": args.seed,
        "command": f"python -m {script}" + (" " + shlex.join(args_list) if args_list else ""),
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__, "numpy": np.__version__},
        "dtype": "float32",
    }


def diffusion_cli(script: str, doc: str, defaults: dict) -> argparse.ArgumentParser:
    """The options the zoo's diffusion-model training scripts share (``defaults``: steps, out,
    batch, lr, log_every); each script adds its own before parsing with :func:`parse_cli`."""
    ap = argparse.ArgumentParser(prog=f"python -m {script}", description=doc.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=defaults["steps"], help=f"optimizer steps (default {defaults['steps']})")
    ap.add_argument("--seed", type=int, default=0, help="seed for init, batches, timesteps, noise and samples (default 0)")
    ap.add_argument("--out", default=None, help=f"output stem or directory (default: the shipped {defaults['out']})")
    ap.add_argument("--batch", type=int, default=defaults["batch"])
    ap.add_argument("--lr", type=float, default=1e-3, help=defaults["lr_help"])
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights (default 0.999)")
    ap.add_argument("--samples", type=int, default=1000, help="samples scored for the card (default 1000)")
    ap.add_argument("--log-every", type=int, default=defaults["log_every"])
    ap.add_argument("--rescore", action="store_true",
                    help="do not train: recompute the card's quality section from the weights at --out (default: the shipped ones)")
    return ap


def parse_cli(ap: argparse.ArgumentParser, argv=None):
    """(args, the argument list as given): steps >= 1 and at least 200 scored samples."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = ap.parse_args(args_list)
    if args.steps < 1 or args.samples < 200:
        ap.error("--steps must be >= 1 and --samples >= 200")
    return args, args_list
