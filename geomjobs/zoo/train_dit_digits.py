"""Train the zoo model ``dit-digits``: a small DiT (adaLN-Zero, GELU) in pixel space on scikit-learn's digits.

    python -m geomjobs.zoo.train_dit_digits                          # writes geomjobs/zoo/dit_digits.{npz,json}
    python -m geomjobs.zoo.train_dit_digits --steps 20 --samples 200 --out /tmp/x   # quick smoke run
    python -m geomjobs.zoo.train_dit_digits --rescore                # recompute the card's quality section

Data: the 1437 training digits of :func:`geomjobs.zoo.digits.digits_split` (the 360 held-out ones
are only used to score samples), pixels raw / 16 * 2 - 1 in [-1, 1], shape (8, 8).

Schedule: cosine (Nichol & Dhariwal 2021), T = 1000 (:mod:`geomjobs.diffusion`; ``--schedule linear``
gives the linear betas 1e-4..0.02 of the first dit-digits). On 8x8 images the linear schedule
leaves almost no signal after the first third of the timesteps (abar_300 = 0.036), so most of the
training and sampling steps see pure noise; the cosine one spreads the signal-to-noise ratio
evenly over t. The generator and the samplers read the schedule from the card. Model:
:class:`geomjobs.generators.dit.DiT` (patch 2 -> 16 tokens, D = 64, 4 blocks, 4 heads, MLP ratio 4).
Loss: E ||eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t)||^2 (mean over pixels),
t ~ U{0..T-1}; Adam, batch 128 with replacement; the shipped weights are an exponential moving
average (``--ema``, with the warm-up of :func:`geomjobs.zoo.training.warm_ema_decay`) of the
iterates. Three stages: (1) ``--steps`` steps at a constant learning rate ``--lr`` after a linear
warm-up; (2) ``--refine-steps`` steps restarted from stage 1's EMA (fresh Adam moments) with the
learning rate warmed up to ``--refine-lr`` and decayed to 0 by a half cosine; (3) ``--polish-steps``
steps the same way from stage 2's EMA, with their own ``--polish-lr``, ``--polish-batch`` and
``--polish-ema`` (a lower rate, larger batches, a longer average: stage 2's figures had levelled
off, and a third pass moved all three; card ``training.polish``). All randomness from
--seed. Nothing in stage 1 depends on --steps except where it stops, so its weights after n steps
of a longer run are those of ``--steps n --refine-steps 0``: ``--eval-every K`` writes such a
snapshot (weights and card) to ``--snapshots`` every K stage-1 steps and prints its 200-sample
figures (in stage 2 only the figures), and ``--init SNAPSHOT`` runs stage 2 from one (the same
weights as running both stages; the shipped ones were made so, after watching the figures of
stage 1 level off: card ``training.stage_1_from``); ``--init`` given weights that ran stages 1 and
2 (a card with ``refine`` and no ``polish``) runs stage 3 only, from them (card ``training.stages_from``).

Card quality figures (:mod:`geomjobs.zoo.quality`): ``--samples`` samples (sample i's noise from
``default_rng([seed, i])``) by deterministic DDIM-50, mapped back to [0, 1], scored by
``classifier-digits`` against the held-out digits, and their nearest-real-digit ratio
(:func:`geomjobs.zoo.quality.nn_ratio`, against the training digits); reported at each count in
``counts`` (the tests recompute the smallest one from the shipped weights).
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from geomjobs import diffusion
from geomjobs.generators.base import Denoiser
from geomjobs.generators.classifier import from_signed, load_classifier
from geomjobs.generators.dit import DiT, init_params, load_dit, module_config, save_dit
from geomjobs.zoo.digits import digits_images, digits_split
from geomjobs.zoo.quality import data_reference, ddim_samples, image_quality, nearest_distances, nn_ratio, sample_figures
from geomjobs.zoo.train_classifier_digits import DATA, out_stem
from geomjobs.zoo.training import card_common, diffusion_cli, diffusion_step, parse_cli, run_steps

DEFAULT_STEPS = 6000
DEFAULT_REFINE = 7000
POLISH = {"steps": 10000, "lr": 2e-4, "batch": 256, "ema": 0.9995}     # stage 3's defaults
REFINE_WARMUP = 100
STAGE1_LR = "linear warm-up over {warmup} steps, then constant"
STAGE1_EMA_WARMUP = "decay min(ema, (1 + n) / (10 + n)) at update n"
DEFAULT_OUT = Path(__file__).resolve().parent / "dit_digits"
SCHEDULES = {"cosine": {"kind": "cosine", "T": 1000},
             "linear": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}}
ARCH = {"image_size": 8, "patch": 2, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 4, "freq_dim": 256}
SAMPLER = {"kind": "ddim", "steps": 50, "eta": 0.0, "spacing": "leading, t_k = k * (T // steps)", "final_abar": 1.0}
DATA_SCALE = "x / 16 * 2 - 1 (pixels in [-1, 1]); samples are mapped back by (x + 1) / 2, clipped to [0, 1]"


def digits_pm1():
    """(train, held-out) digits in [-1, 1], (n, 8, 8) float32."""

    images = digits_images()
    tr, te = digits_split(DATA)
    return images[tr] * 2 - 1, images[te] * 2 - 1


def train(steps: int, seed: int, batch: int, lr: float, warmup: int, ema: float, log_every: int, log=print,
          schedule: dict = SCHEDULES["cosine"], every: int = 0, callback=None,
          refine_steps: int = 0, refine_lr: float = 5e-4, init=None, polish: dict | None = None, init_stage: int = 1):
    """Stage 1: ``steps`` steps at a constant ``lr`` after the warm-up; ``callback(i, module, ema
    params, curve, seconds)`` every ``every`` steps. Stage 2 (``refine_steps`` > 0): the iterates
    and their EMA restart from stage 1's EMA, Adam's moments from zero, and the learning rate
    warms up over :data:`REFINE_WARMUP` steps to ``refine_lr`` and decays to 0 by a half cosine;
    the batch keys continue those of stage 1. ``init`` = stage 1's EMA params (a snapshot of this
    script's ``--steps steps`` run) skips stage 1; the result is the same, the key sequence being
    fast-forwarded by ``steps``. Stage 3 (``polish`` = {steps, lr, batch, ema} with steps > 0) does
    what stage 2 does from stage 2's EMA with its own rate, batch size and EMA decay, the keys
    continuing those of stage 2; ``init_stage`` = 2 says ``init`` is stage 2's EMA (of this
    ``steps`` and ``refine_steps``): stages 1 and 2 are skipped. Returns (module, EMA params,
    stage-1 curve, stage-1 seconds, stage-2 curve, stage-2 seconds, stage-3 curve, stage-3 seconds)."""
    import jax
    import jax.numpy as jnp
    import optax

    data = jnp.asarray(digits_pm1()[0])
    abar = diffusion.abar(schedule)
    sqrt_ab, sqrt_1mab = jnp.asarray(np.sqrt(abar), jnp.float32), jnp.asarray(np.sqrt(1 - abar), jnp.float32)
    T = schedule["T"]
    module = DiT(**ARCH)
    key = jax.random.PRNGKey(seed)
    key, k_init = jax.random.split(key)

    def loss_fn(p, x0, t, eps):
        xt = sqrt_ab[t, None, None] * x0 + sqrt_1mab[t, None, None] * eps
        return jnp.mean((module.apply(p, xt, t) - eps) ** 2)

    curve, wall = [], 0.0
    if init is None:
        params = init_params(module, k_init)
        sched = optax.join_schedules([optax.linear_schedule(0.0, lr, max(warmup, 1)), optax.constant_schedule(lr)], [max(warmup, 1)])
        opt = optax.adam(sched)
        step = diffusion_step(loss_fn, opt, data, batch, T, ema, ema_warmup=True)
        cb = None if callback is None else (lambda i, state, c, secs: callback(i, module, state[1], c, secs))
        (_, ema_params, _), curve, wall = run_steps(step, (params, params, opt.init(params)), key, steps, log_every, log, every, cb)
    else:
        ema_params = init
    split = jax.jit(lambda k: jax.random.split(k)[0])

    def restart(params, key, n: int, peak: float, batch: int, ema: float, offset: int):
        """``n`` steps from ``params`` (iterates and EMA), fresh Adam, warm-up then half-cosine decay."""
        w = min(REFINE_WARMUP, max(n - 1, 1))
        sched = optax.join_schedules([optax.linear_schedule(0.0, peak, w),
                                      optax.cosine_decay_schedule(peak, max(n - w, 1), alpha=0.0)], [w])
        opt = optax.adam(sched)
        step = diffusion_step(loss_fn, opt, data, batch, T, ema, ema_warmup=True)
        cb = None if callback is None else (lambda i, state, c, secs: callback(offset + i, module, state[1], c, secs, refine=True))
        (_, e, _), c, secs = run_steps(step, (params, params, opt.init(params)), key, n, log_every, log, every, cb)
        return e, [{"step": offset + r["step"], "loss": r["loss"]} for r in c], secs

    curve2, wall2, curve3, wall3 = [], 0.0, [], 0.0
    refine_steps = max(refine_steps, 0)
    for _ in range(steps if init_stage == 1 else steps + refine_steps):   # the key the skipped stages end with
        key = split(key)
    if refine_steps > 0 and init_stage == 1:
        ema_params, curve2, wall2 = restart(ema_params, key, refine_steps, refine_lr, batch, ema, steps)
        for _ in range(refine_steps):
            key = split(key)
    if polish and polish["steps"] > 0:
        ema_params, curve3, wall3 = restart(ema_params, key, polish["steps"], polish["lr"], polish["batch"], polish["ema"],
                                            steps + refine_steps)
    return module, ema_params, curve, wall, curve2, wall2, curve3, wall3


def measure_quality(module, params, meta: dict, counts, seed: int, steps: int) -> dict:
    """The card's ``quality`` section: DDIM samples of the DiT scored against the held-out digits."""

    clf = load_classifier()
    train_x, held_x = (from_signed(a) for a in digits_pm1())
    den = Denoiser(eps=lambda p, x, t: module.apply(p, x, t), abar=diffusion.abar(meta["schedule"]))
    x0 = ddim_samples(den, params, seed, max(counts), (module.image_size, module.image_size), steps)
    return {"classifier": "classifier-digits", "seed": seed, "noise": "sample i: numpy default_rng([seed, i]).standard_normal((8, 8))",
            "sampler": {**SAMPLER, "steps": steps}, "postprocess": "(x + 1) / 2 clipped to [0, 1]",
            "data": {**data_reference(clf, train_x, held_x),
                     "heldout_nn_median": round(float(np.median(nearest_distances(held_x, train_x))), 6)},
            "samples": sample_figures(clf, from_signed(x0), held_x, sorted(counts), train=train_x),
            "figures": "confidence = mean max-probability; fd_to_reference = Frechet distance of classifier features "
                       "to the held-out digits; vendi_features = cosine-kernel Vendi (q = 1) of the features; "
                       "nn_ratio = median Euclidean distance ([0, 1] pixels) of a sample to its nearest training digit / "
                       "the same median for the held-out digits (data.heldout_nn_median)"}


def _restart_card(n: int, peak: float, init: str, curve, secs: float, **extra) -> dict:
    return {"steps": n, "lr": peak, **extra,
            "lr_schedule": f"linear warm-up over {min(REFINE_WARMUP, max(n - 1, 1))} steps, then half-cosine decay to 0",
            "init": init, "final_loss": curve[-1]["loss"], "loss_curve": curve, "wall_time_s": round(secs, 1)}


def card(args, args_list, steps: int, curve, wall: float, module, params, refine=None, polish=None) -> dict:
    """The card of the weights after ``steps`` stage-1 steps (without its quality section); with
    ``refine`` = (curve, seconds) of stage 2, of the weights after stages 1 and 2; with ``polish``
    = (curve, seconds) of stage 3 as well, of the weights after all three."""
    argv = (_with_steps(args_list, steps, keep_refine=refine is not None, keep_polish=polish is not None)
            + ([] if refine is not None else ["--refine-steps", "0"]) + ([] if polish is not None else ["--polish-steps", "0"]))
    common = card_common("geomjobs.zoo.train_dit_digits", argparse.Namespace(**{**vars(args), "steps": steps}),
                         argv, curve, wall, params)
    schedule = SCHEDULES[args.schedule]
    return {
        "model_id": "dit-digits",
        "description": f"DiT (adaLN-Zero, GELU) eps-prediction in pixel space on scikit-learn's 8x8 digits, {args.schedule} "
                       "schedule; generator = the denoiser at `timestep` (default 0), x_t (8, 8) -> x0_hat (default) or eps",
        "latent_shape": [8, 8],
        "data": {**DATA, "diffusion_scale": DATA_SCALE, "trained_on": "the training split only"},
        "schedule": schedule,
        "prediction": "eps",
        **common,
        "training": {**common["training"], "optimizer": "adam",
                     "lr_schedule": STAGE1_LR.format(warmup=args.warmup),
                     "ema": args.ema, "ema_warmup": STAGE1_EMA_WARMUP,
                     "shipped_weights": "the EMA of the iterates",
                     "loss": "mean over batch and pixels of (eps - eps_theta(x_t, t))^2, t ~ U{0..T-1}",
                     "augmentation": "none",
                     **({} if refine is None else {"refine": _restart_card(
                         args.refine_steps, args.refine_lr,
                         "iterates and EMA restart from the stage-1 EMA; Adam's moments from zero; the batch keys continue", *refine)}),
                     **({} if polish is None else {"polish": _restart_card(
                         args.polish_steps, args.polish_lr,
                         "iterates and EMA restart from the stage-2 EMA; Adam's moments from zero; the batch keys continue", *polish,
                         batch=args.polish_batch, ema=args.polish_ema)})},
        "architecture": module_config(module),
    }


_NOT_WEIGHTS = ("--steps", "--eval-every", "--snapshots", "--out", "--init", "--samples", "--log-every")


POLISH_FLAGS = ("--polish-steps", "--polish-lr", "--polish-batch", "--polish-ema")


def _with_steps(args_list, steps: int, keep_refine: bool = True, keep_polish: bool = True) -> list:
    """The argument list that trains the same weights: --steps set to ``steps``, the options that
    do not change the weights dropped (and the --refine-* ones unless ``keep_refine``, the
    --polish-* ones unless ``keep_polish``)."""
    drop = _NOT_WEIGHTS + (() if keep_refine else ("--refine-steps", "--refine-lr")) + (() if keep_polish else POLISH_FLAGS)
    out, skip = [], False
    for a in args_list:
        if skip:
            skip = False
        elif a in drop:
            skip = True
        elif not a.startswith(tuple(d + "=" for d in drop)):
            out.append(a)
    return ["--steps", str(steps), *out] if steps != DEFAULT_STEPS else out


def snapshot_callback(args, args_list, directory: Path, log=print):
    """Every ``--eval-every`` steps: the weights and card as ``--steps i`` would write them, and
    the EMA's 200-sample figures (the card's sampler and seed)."""
    clf = load_classifier()
    train_x, held_x = (from_signed(a) for a in digits_pm1())
    directory.mkdir(parents=True, exist_ok=True)

    def cb(i, module, params, curve, wall, refine=False):
        if not refine:                      # a stage-2 or -3 state is not that of any --steps / --refine-steps run
            meta = card(args, args_list, i, curve, wall, module, params)
            save_dit(directory / f"dit_digits_{i}", module, params, meta)
        den = Denoiser(eps=lambda p, x, t: module.apply(p, x, t), abar=diffusion.abar(SCHEDULES[args.schedule]))
        x = from_signed(ddim_samples(den, params, args.seed, 200, (8, 8), SAMPLER["steps"]))
        q = image_quality(clf, x, held_x)
        log(f"snapshot {i}: 200 samples: nn_ratio {nn_ratio(x, train_x, held_x):.3f}  confidence {q['confidence']:.4f}  "
            f"FD {q['fd_to_reference']:.2f}  classes {q['class_counts']}", flush=True)

    return cb


def main(argv=None) -> int:

    ap = diffusion_cli("geomjobs.zoo.train_dit_digits", __doc__, {
        "steps": DEFAULT_STEPS, "out": "geomjobs/zoo/dit_digits", "batch": 128, "log_every": 250,
        "lr_help": "peak Adam learning rate (default 1e-3)"})
    ap.add_argument("--warmup", type=int, default=200, help="linear warm-up steps (default 200)")
    ap.add_argument("--schedule", choices=sorted(SCHEDULES), default="cosine", help="noise schedule (default cosine)")
    ap.add_argument("--eval-every", type=int, default=0, help="write a scored snapshot every K steps (default: none)")
    ap.add_argument("--snapshots", default="out/dit_snapshots", help="folder of the --eval-every snapshots")
    ap.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE,
                    help=f"stage-2 steps from stage 1's EMA with a decaying learning rate (default {DEFAULT_REFINE}; 0: none)")
    ap.add_argument("--refine-lr", type=float, default=5e-4, help="stage 2's peak learning rate (default 5e-4)")
    ap.add_argument("--polish-steps", type=int, default=POLISH["steps"],
                    help=f"stage-3 steps from stage 2's EMA with a decaying learning rate (default {POLISH['steps']}; 0: none)")
    ap.add_argument("--polish-lr", type=float, default=POLISH["lr"], help=f"stage 3's peak learning rate (default {POLISH['lr']})")
    ap.add_argument("--polish-batch", type=int, default=POLISH["batch"], help=f"stage 3's batch size (default {POLISH['batch']})")
    ap.add_argument("--polish-ema", type=float, default=POLISH["ema"], help=f"stage 3's EMA decay (default {POLISH['ema']})")
    ap.add_argument("--init", default=None,
                    help="a stage-1 snapshot (--eval-every) of this run's --steps: skip stage 1 and start stage 2 from it; "
                         "or weights of this run's stages 1 and 2 (--polish-steps 0): run stage 3 from them")
    args, args_list = parse_cli(ap, argv)

    stem = out_stem(args.out, DEFAULT_OUT)
    if args.rescore:
        module, params, meta = load_dit(stem)
    else:
        init, stage1, init_stage = None, None, 1
        if args.init is not None:
            _, init, stage1 = load_dit(args.init)
            tr = stage1["training"]
            got = (tr["steps"], stage1["seed"], tr["batch"], tr["lr"], tr["ema"], tr.get("ema_warmup"), tr["lr_schedule"],
                   stage1["schedule"])
            want = (args.steps, args.seed, args.batch, args.lr, args.ema, STAGE1_EMA_WARMUP,
                    STAGE1_LR.format(warmup=args.warmup), SCHEDULES[args.schedule])
            if "refine" in tr:                  # weights after stages 1 and 2: stage 3 from them
                init_stage = 2
                got += (tr["refine"]["steps"], tr["refine"]["lr"])
                want += (args.refine_steps, args.refine_lr)
            if got != want or "polish" in tr:
                what = "stages 1 and 2" if init_stage == 2 else "stage 1"
                why = "ran stage 3 already" if "polish" in tr else f"is not this run's {want}"
                ap.error(f"--init {args.init}: its {what} {got} {why}")
            if init_stage == 2 and args.polish_steps <= 0:
                ap.error(f"--init {args.init} ran stages 1 and 2: --polish-steps must be > 0 to train anything")
        cb = snapshot_callback(args, args_list, Path(args.snapshots)) if args.eval_every > 0 else None
        polish = {"steps": args.polish_steps, "lr": args.polish_lr, "batch": args.polish_batch, "ema": args.polish_ema}
        module, params, curve, wall, curve2, wall2, curve3, wall3 = train(
            args.steps, args.seed, args.batch, args.lr, args.warmup, args.ema, max(args.log_every, 1),
            schedule=SCHEDULES[args.schedule], every=args.eval_every, callback=cb,
            refine_steps=args.refine_steps, refine_lr=args.refine_lr, init=init, polish=polish, init_stage=init_stage)
        if stage1 is not None:
            curve, wall = stage1["training"]["loss_curve"], stage1["training"]["wall_time_s"]
        if init_stage == 2:
            r = stage1["training"]["refine"]
            curve2, wall2 = r["loss_curve"], r["wall_time_s"]
        meta = card(args, args_list, args.steps, curve, wall, module, params, refine=(curve2, wall2) if curve2 else None,
                    polish=(curve3, wall3) if curve3 else None)
        if init_stage == 2:
            if "stage_1_from" in stage1["training"]:
                meta["training"]["stage_1_from"] = stage1["training"]["stage_1_from"]
            meta["training"]["stages_from"] = (f"stage 3 computed from weights of stages 1 and 2 (--init; the same weights as "
                                               f"running them here), written by `{stage1['command']}`")
        elif stage1 is not None:
            meta["training"]["stage_1_from"] = (f"computed from a step-{args.steps} stage-1 snapshot (--init; the same weights "
                                                f"as running stage 1 here), written by `{stage1['command']}`")
        save_dit(stem, module, params, meta)       # the weights are safe before the (minutes of) scoring
    t0 = time.perf_counter()
    meta["quality"] = measure_quality(module, params, meta, sorted({200, args.samples}), meta["seed"], SAMPLER["steps"])
    meta["quality"]["wall_time_s"] = round(time.perf_counter() - t0, 1)
    meta["quality"]["scored_by"] = "python -m geomjobs.zoo.train_dit_digits" + (" " + shlex.join(args_list) if args_list else "")
    q = meta["quality"]
    big = q["samples"][str(args.samples)]
    print(f"{args.samples} DDIM-{SAMPLER['steps']} samples: confidence {big['confidence']:.4f} "
          f"(held-out digits {q['data']['heldout_confidence']:.4f}); FD to held-out {big['fd_to_reference']:.3f} "
          f"(held-out vs train {q['data']['fd_heldout_train']:.3f}); nearest-real-digit ratio {big['nn_ratio']:.3f}; "
          f"classes {big['class_counts']}")
    npz_path, json_path = save_dit(stem, module, params, meta)
    print(f"wrote {npz_path} ({npz_path.stat().st_size} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
