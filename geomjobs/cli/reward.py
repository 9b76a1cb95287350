"""``geomjobs reward train|evaluate``: the work is done by :func:`geomjobs.reward.train.train`
and :func:`geomjobs.reward.evaluate.evaluate`."""
from __future__ import annotations

import argparse
import dataclasses
import math

from geomjobs.reward.config import TrainConfig

# the training flags: (TrainConfig field, type, help); the defaults shown are TrainConfig's own
TRAIN_FLAGS = [
    ("steps", int, "optimiser steps at most"),
    ("batch_size", int, "rows per step"),
    ("lr", float, "peak AdamW learning rate (warm-up then cosine decay)"),
    ("weight_decay", float, "AdamW weight decay"),
    ("eval_every", int, "steps between held-out evaluations and checkpoints"),
    ("patience", int, "stop after this many evaluations without a better held-out loss"),
    ("val_fraction", float, "share of sample ids held out"),
    ("val_rows", int, "held-out rows used for early stopping at most (the final metrics use every held-out row)"),
    ("seed", int, "initialisation and batch order seed"),
    ("hidden", int, "network width"),
    ("depth", int, "network layers / conv stages"),
    ("temb", int, "timestep embedding size"),
    ("channels", int, "conv net channels of the first stage"),
]


def _train(args) -> int:
    from geomjobs.reward.train import train
    from geomjobs.sink.fs import normalize_uri

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    meta = train(args.datasets, args.out, args.target, config, resume=args.resume, progress=not args.quiet)
    print(f"reward model -> {normalize_uri(args.out)}: n_train {meta['n_train']}, n_val {meta['n_val']}, "
          f"val R^2 {meta['val_r2']:.4f}, val Spearman {meta['val_spearman']:.4f} "
          f"(best step {meta['best_step']} of {meta['steps_run']}{', stopped early' if meta['stopped_early'] else ''})")
    return 0


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _evaluate(args) -> int:
    from geomjobs.reward.evaluate import evaluate
    from geomjobs.sink.fs import join, normalize_uri

    res = evaluate(args.baseline, list(args.guided), args.out)
    for _, r in res["datasets"].iterrows():
        fd = "" if _missing(r["fd_heldout"]) else f", FD to held-out digits {r['fd_heldout']:.3f}"
        q = "" if _missing(r["quality"]) else f", quality {r['quality']:.4f}"
        print(f"scale {r['guidance_scale']:g}: {int(r['count'])} samples, mean psi {r['psi_mean']:.4f} "
              f"+- {r['psi_ci95']:.4f}, Vendi {r['vendi']:.3f}{q}{fd}  ({r['dataset']})")
    print(f"-> {join(normalize_uri(args.out), 'levelsets.parquet')}, {res['png']}")
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser("reward", help="train a reward model r(z_t, t) -> psi on datasets; evaluate guided sampling")
    rs = r.add_subparsers(dest="reward_command", required=True)
    t = rs.add_parser("train", help="train r(z_t, t) -> TARGET on the 'ok' rows of one or more datasets")
    t.add_argument("datasets", nargs="+", metavar="DATASET", help="geomjobs dataset URIs (local or gs://)")
    t.add_argument("--out", required=True, help="reward folder to write (local or gs://)")
    t.add_argument("--target", default="local_scaling", help="record column to regress (default: local_scaling)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, kind, text in TRAIN_FLAGS:
        shown = "the model kind's own" if defaults[name] is None else defaults[name]
        t.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (default {shown})")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoints when it holds this run's checkpoint (default); --no-resume starts over")
    t.set_defaults(fn=_train)
    e = rs.add_parser("evaluate", help="psi, diversity and quality per level set of the baseline's psi")
    e.add_argument("baseline", metavar="BASELINE", help="the unguided dataset (local or gs://)")
    e.add_argument("guided", nargs="+", metavar="GUIDED", help="guided datasets with the same seeds and sample ids")
    e.add_argument("--out", required=True, help="folder for levelsets.parquet and the three-panel PNG")
    e.set_defaults(fn=_evaluate)
