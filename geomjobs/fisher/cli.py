"""``geomjobs fisher SPEC.yaml [--out URI]`` (SPEC section 8): argument parsing only; the work is
done by :mod:`geomjobs.fisher.job`, imported when the command runs."""
from __future__ import annotations


def _fisher(args) -> int:
    from geomjobs.fisher.job import fisher_cli

    return fisher_cli(args)


def add_parser(sub) -> None:
    f = sub.add_parser("fisher", help="the Fisher metric of a 2-D family on a theta grid (Ising, TASEP, diffusion slice)")
    f.add_argument("spec", help="fisher spec (YAML)")
    f.add_argument("--out", help="output folder URI (overrides the spec's 'output')")
    f.add_argument("--address", help="Ray cluster address for the sampling job (default: local mode)")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    f.set_defaults(fn=_fisher)
