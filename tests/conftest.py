"""Test-wide numerics: float64 in JAX so that references computed in NumPy can be matched at
tight tolerances (jobs still run in their spec's dtype, float32 by default). Subprocess tests
(CLI, demo) run without x64, as users do."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before any test module imports ray: keep every Ray address on loopback (otherwise Ray rewrites
# 127.0.0.1 to the machine's interface address when a client connects, and the client hangs).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
# One XLA compilation cache per test session, shared by every process the suite starts (CLI runs,
# Ray workers, notebooks inherit the variables): the suite compiles the same small programs many
# times over (the test MLP's step in dozens of jobs), and compiling is most of its CPU time. Every
# program is cached, however quick to compile; the folder starts empty and is removed at exit, so
# nothing outlives the run. A value already set (a developer's own cache) is kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="geomjobs-tests-xla-cache-")
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": _CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


# The mathematics runs under strict dtype promotion: an implicit float32 -> float64 (or int ->
# float) promotion there is a bug. Modules that load diffusers models or train zoo models, whose
# own code promotes implicitly, run under the standard rules.
STRICT_PROMOTION = {"test_descriptors", "test_estimators", "test_modes", "test_complexity", "test_jobs",
                    "test_chunk_fit", "test_diffusion"}


# `make test` runs the suite on 2 pytest-xdist workers (--dist loadgroup): the serial run keeps
# one of 2 cores idle about half the time (tests waiting on subprocesses, Ray, the GCS emulator).
# The modules that start a Ray cluster (one per test process, ray_cluster.shared_cluster) or the
# GCS emulator with a cluster job share one group, hence one worker: one cluster for all of them,
# as in the serial run, and no two clusters' workers competing for the 2 cores under a fault
# test's pacing.
RAY_GROUP = {"test_ray", "test_ray_chaos", "test_ray_overlap", "test_gcs", "test_gcs_faults", "test_scale",
             "test_submit_check"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in RAY_GROUP:
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(autouse=True)
def dtype_promotion(request):
    name = request.module.__name__.rsplit(".", 1)[-1]
    with jax.numpy_dtype_promotion("strict" if name in STRICT_PROMOTION else "standard"):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


