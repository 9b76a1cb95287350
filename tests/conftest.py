"""Test-wide numerics: float64 in JAX so that references computed in NumPy can be matched at
tight tolerances (jobs still run in their spec's dtype, float32 by default). Subprocess tests
(CLI, demo) run without x64, as users do."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Before any test module imports ray: keep every Ray address on loopback (otherwise Ray rewrites
# 127.0.0.1 to the machine's interface address when a client connects, and the client hangs).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def matrix_with_singular_values(s, rows, cols, seed=0):
    """rows x cols matrix U diag(s) V^T with Haar-random U, V: a known spectrum."""
    r = np.random.default_rng(seed)
    u, _ = np.linalg.qr(r.standard_normal((rows, rows)))
    v, _ = np.linalg.qr(r.standard_normal((cols, cols)))
    m = np.zeros((rows, cols))
    m[: len(s), : len(s)] = np.diag(s)
    return u @ m @ v.T
