"""The package version, on the lowest floor so that any layer can read it without importing
the package face (``geomjobs/__init__.py`` imports the runner)."""
__version__ = "0.1.0"
