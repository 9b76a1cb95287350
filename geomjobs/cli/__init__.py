"""The ``geomjobs`` command line: one module per group of verbs (``run``: run, inspect;
``submit``: submit, status, logs; ``reward``; ``fisher``). A verb parses its arguments, calls a
library function with typed arguments, prints, and returns an exit code:

0  every sample (or grid point) has an 'ok' row;
1  the job ran but some samples or shards failed, or a Ray worker could not start;
2  the spec, a file it names, the output location or a job id is unusable: nothing was computed.

The verbs import the library (JAX, Ray) only when they run, so ``geomjobs --help`` and argument
errors answer at once.
"""
from __future__ import annotations

import argparse
import os
import sys

from geomjobs._version import __version__
from geomjobs.cli import fisher, reward, run, submit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geomjobs", description="Local geometry of generative models, as batch jobs.")
    p.add_argument("--version", action="version", version=f"geomjobs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run, submit, reward, fisher):
        group.add_parsers(sub)
    return p


def main(argv=None) -> int:
    from geomjobs.errors import DatasetError, SpecError, WorkerPoolError

    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (SpecError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WorkerPoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:   # e.g. `geomjobs inspect URI | head`: the reader is gone, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("interrupted: committed shards are kept; run the same command again to finish", file=sys.stderr)
        return 130


__all__ = ["build_parser", "main"]
