"""Which shipped weights a job used: a digest of each zoo model's weights file, for job cards."""
from __future__ import annotations

import hashlib
from pathlib import Path

ZOO_DIR = Path(__file__).resolve().parent


def zoo_weights(spec) -> dict[str, str]:
    """sha256 (first 16 hex digits) of the shipped weights of every zoo model a spec names
    anywhere (``{kind: zoo, name: ...}`` as the model, a sampler's denoiser, a decoder...). A job
    card records them, so that a rerun after the shipped weights changed is refused instead of
    resumed onto records computed with the old ones."""
    names: set[str] = set()

    def walk(x):
        if isinstance(x, dict):
            if x.get("kind") == "zoo" and isinstance(x.get("name"), str):
                names.add(x["name"])
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(spec)
    out = {}
    for name in sorted(names):
        f = ZOO_DIR / (name.replace("-", "_") + ".npz")
        if f.is_file():
            out[name] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    return out
