"""Writes tests/data/v1-sampled-ddpm: run it with geomjobs at e501131 (record schema version 1),
float64 enabled as tests/conftest.py does, then the job is cut back to an interrupted one.

    git archive e501131 | tar -x -C /tmp/base
    PYTHONPATH=/tmp/base python tests/data/make_v1_dataset.py tests/data/v1-sampled-ddpm
"""
import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from geomjobs import run_job  # noqa: E402
from geomjobs.records import SCHEMA_VERSION  # noqa: E402

# the same spec as tests/test_record_versions.py's SPEC
SPEC = {"job_id": "v1-sampled-ddpm",
        "model": {"kind": "zoo", "name": "ddpm-gmm2d", "timestep": 10, "prediction": "x0"},
        "latents": {"kind": "sampled", "model": {"kind": "zoo", "name": "ddpm-gmm2d"},
                    "sampler": {"kind": "ddim", "steps": 5}, "count": 8, "seed": 3, "save_latent": True, "batch_size": 4},
        "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
        "execution": {"shard_size": 2, "batch_size": 2}}


def main(out: str) -> None:
    assert SCHEMA_VERSION == 1, "run this with the release that wrote record schema version 1"
    shutil.rmtree(out, ignore_errors=True)
    res = run_job(SPEC, out)
    assert res.ok, res
    # an interrupted job: shards 2 and 3 not committed (no marker, no file), the manifest cache dropped
    for s in (2, 3):
        os.remove(os.path.join(out, f"part-{s:06d}.parquet"))
        os.remove(os.path.join(out, "_geomjobs", "shards", f"{s:06d}.json"))
    cache = os.path.join(out, "_geomjobs", "manifest.json.gz")
    if os.path.exists(cache):
        os.remove(cache)


if __name__ == "__main__":
    main(sys.argv[1])
