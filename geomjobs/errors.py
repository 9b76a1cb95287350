"""The errors geomjobs raises on purpose (no dependencies, so every floor may raise them).

The CLI maps them to exit codes: SpecError and DatasetError 2, WorkerPoolError 1. The old homes
keep the names importable (``geomjobs.spec.SpecError``, ``geomjobs.sink.dataset.DatasetError``,
``geomjobs.runner.ray_connect.WorkerPoolError``).
"""
from __future__ import annotations


class SpecError(ValueError):
    """A job spec (or a file it names) is not what geomjobs expects. Exit code 2."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"spec key '{key}': {message}" if key else message)


class DatasetError(RuntimeError):
    """The output location cannot be used as asked (holds a different job, is a file, is not a dataset...)."""


class WorkerPoolError(RuntimeError):
    """The cluster cannot be reached, or a worker cannot start (its constructor raised: the
    model missing on its node, an import error, another geomjobs version); committed shards are
    kept (resume later). Worker deaths alone never raise it: dead workers are replaced."""


__all__ = ["DatasetError", "SpecError", "WorkerPoolError"]
