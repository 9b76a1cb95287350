"""The one error a job spec raises (no dependencies, so every layer may raise it)."""
from __future__ import annotations


class SpecError(ValueError):
    """A job spec (or a file it names) is not what geomjobs expects. Exit code 2."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"spec key '{key}': {message}" if key else message)
