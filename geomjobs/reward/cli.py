"""``geomjobs reward train|evaluate`` (SPEC section 7): argument parsing only; the work is done
by :mod:`geomjobs.reward.train` and :mod:`geomjobs.reward.evaluate`, imported when a command runs
(so that ``geomjobs --help`` does not import JAX)."""
from __future__ import annotations

import argparse


def _train(args) -> int:
    from geomjobs.reward.train import train_cli

    return train_cli(args)


def _evaluate(args) -> int:
    from geomjobs.reward.evaluate import evaluate_cli

    return evaluate_cli(args)


def add_parser(sub) -> None:
    r = sub.add_parser("reward", help="train a reward model r(z_t, t) -> psi on datasets; evaluate guided sampling")
    rs = r.add_subparsers(dest="reward_command", required=True)
    t = rs.add_parser("train", help="train r(z_t, t) -> TARGET on the 'ok' rows of one or more datasets")
    t.add_argument("datasets", nargs="+", metavar="DATASET", help="geomjobs dataset URIs (local or gs://)")
    t.add_argument("--out", required=True, help="reward folder to write (local or gs://)")
    t.add_argument("--target", default="local_scaling", help="record column to regress (default: local_scaling)")
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    # training options (defaults: geomjobs.reward.train.TrainConfig)
    t.add_argument("--steps", type=int, help="optimiser steps at most (default 3000)")
    t.add_argument("--batch-size", type=int, help="rows per step (default 256)")
    t.add_argument("--lr", type=float, help="peak AdamW learning rate (default 2e-3; warm-up then cosine decay)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 1e-4)")
    t.add_argument("--eval-every", type=int, help="steps between held-out evaluations and checkpoints (default 100)")
    t.add_argument("--patience", type=int, help="stop after this many evaluations without a better held-out loss (default 8)")
    t.add_argument("--val-fraction", type=float, help="share of sample ids held out (default 0.1)")
    t.add_argument("--val-rows", type=int, help="held-out rows used for early stopping at most (default 20000; "
                                                "the final metrics use every held-out row)")
    t.add_argument("--seed", type=int, help="initialisation and batch order seed (default 0)")
    t.add_argument("--hidden", type=int, help="network width (default 128)")
    t.add_argument("--depth", type=int, help="network layers / conv stages (default 3)")
    t.add_argument("--temb", type=int, help="timestep embedding size (default 64)")
    t.add_argument("--channels", type=int, help="conv net channels of the first stage (default 32)")
    t.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue from OUT/checkpoints when it holds this run's checkpoint (default); --no-resume starts over")
    t.set_defaults(fn=_train)
    e = rs.add_parser("evaluate", help="psi, diversity and quality per level set of the baseline's psi")
    e.add_argument("baseline", metavar="BASELINE", help="the unguided dataset")
    e.add_argument("guided", nargs="+", metavar="GUIDED", help="guided datasets with the same seeds and sample ids")
    e.add_argument("--out", required=True, help="folder for levelsets.parquet and the three-panel PNG")
    e.set_defaults(fn=_evaluate)
