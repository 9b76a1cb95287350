"""``geomjobs reward train|evaluate`` (SPEC section 7): argument parsing only; the work is done
by :mod:`geomjobs.reward.train` and :mod:`geomjobs.reward.evaluate`, imported when a command runs
(so that ``geomjobs --help`` does not import JAX)."""
from __future__ import annotations


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
    # train options (network, steps, batch size, resume...) are added by the training module's owner here
    t.set_defaults(fn=_train)
    e = rs.add_parser("evaluate", help="psi, diversity and quality per level set of the baseline's psi")
    e.add_argument("baseline", metavar="BASELINE", help="the unguided dataset")
    e.add_argument("guided", nargs="+", metavar="GUIDED", help="guided datasets with the same seeds and sample ids")
    e.add_argument("--out", required=True, help="folder for levelsets.parquet and the three-panel PNG")
    e.set_defaults(fn=_evaluate)
