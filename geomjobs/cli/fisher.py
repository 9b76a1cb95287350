"""``geomjobs fisher SPEC.yaml``: the Fisher metric of a 2-D family (argument parsing in
:mod:`geomjobs.fisher.cli` until the fisher job's typed entry point lands here)."""
from __future__ import annotations


def add_parsers(sub) -> None:
    from geomjobs.fisher.cli import add_parser

    add_parser(sub)
