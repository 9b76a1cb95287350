"""Where datasets live: local paths, file:// URIs and gs:// URIs, through fsspec.

gs:// goes through gcsfs's plain ``gcsfs.core.GCSFileSystem``. Recent gcsfs makes
``gcsfs.GCSFileSystem`` its experimental zonal/HNS subclass unless
``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`` is false when gcsfs is imported; that subclass probes each
bucket's type over gRPC first, which stalls for a minute against emulators and some proxies.
Choosing the class here keeps the probe off without touching the process's environment.
"""
from __future__ import annotations

import os

import fsspec


def normalize_uri(uri: str) -> str:
    """file:///abs -> /abs; relative local paths -> absolute; remote URIs unchanged."""
    uri = str(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if "://" in uri:
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str):
    """(fsspec filesystem, path inside it) for a dataset URI. Listings are never cached, since
    other processes commit shards while we read."""
    uri = normalize_uri(uri)
    if uri.startswith("gs://"):
        from gcsfs.core import GCSFileSystem  # not the zonal/HNS subclass: see the module docstring

        endpoint = os.environ.get("STORAGE_EMULATOR_HOST")
        kw = {"endpoint_url": endpoint, "token": "anon"} if endpoint else {}
        fs = GCSFileSystem(use_listings_cache=False, skip_instance_cache=True, **kw)
        return fs, uri[len("gs://"):]
    fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False, skip_instance_cache=True)
    return fs, path


def is_local(uri: str) -> bool:
    return "://" not in normalize_uri(uri)


def open_input(uri: str, mode: str = "rb"):
    """Open a file named in a spec (weights, latents) wherever it lives."""
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])
