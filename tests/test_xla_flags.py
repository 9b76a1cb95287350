"""geomjobs/_xla.py: the XLA:CPU flag the package sets on import (the YNN ``reduce`` fusion taken
out), the user's own XLA_FLAGS left alone, and the reproducer of the miscompile it avoids: the k
VJP rows of a LayerNorm'd map, vmapped over a batch of 4 under jit, against the same rows one
sample at a time. Without the flag (jaxlib 0.10.2) the batched rows were off by ~9 on rows of
size ~11; dit-digits' psi at batch 16 by up to 0.19. With it they agree exactly (same program
per sample: the batched and single rows are the same float32 operations)."""
import os
import subprocess
import sys
from pathlib import Path

from geomjobs import _xla

ROOT = Path(__file__).resolve().parents[1]

REPRO = """
import geomjobs  # sets XLA_FLAGS before the backend starts
import numpy as np, jax, jax.numpy as jnp, os
rng = np.random.default_rng(0)
a = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
b = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
def norm(x):
    xc = x - jnp.mean(x, axis=-1, keepdims=True)
    return xc * jax.lax.rsqrt(jnp.mean(xc * xc, axis=-1, keepdims=True) + 1e-6)
def f(x):
    return (norm(x.reshape(16, 4) @ a) @ b).reshape(-1)
w = jnp.asarray(np.linalg.qr(rng.standard_normal((64, 64)))[0], jnp.float32)
z = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
def rows(x):
    _, vjp = jax.vjp(f, x)
    return jax.vmap(lambda c: vjp(c)[0])(w)
batched = jax.jit(jax.vmap(rows))(z)
single = jnp.stack([jax.jit(rows)(zi) for zi in z])
print(float(jnp.abs(batched - single).max()), float(jnp.abs(single).max()), os.environ["XLA_FLAGS"])
"""


def test_apply_adds_the_workaround_once_and_leaves_a_users_choice():
    env = {}
    assert _xla.apply(env) and env["XLA_FLAGS"] == _xla.WORKAROUND
    assert not _xla.apply(env) and env["XLA_FLAGS"] == _xla.WORKAROUND
    env = {"XLA_FLAGS": "--xla_cpu_foo=1"}
    assert _xla.apply(env) and env["XLA_FLAGS"] == "--xla_cpu_foo=1 " + _xla.WORKAROUND
    mine = {"XLA_FLAGS": _xla.YNN_OPTION + "=+reduce"}
    assert not _xla.apply(mine) and mine["XLA_FLAGS"] == _xla.YNN_OPTION + "=+reduce"


def test_only_verified_jaxlib_series_get_the_flag():
    # XLA aborts on an unknown flag: other series must not be given it
    assert _xla.affected("0.10.2") and _xla.affected("0.10.0")
    assert not _xla.affected("0.11.0") and not _xla.affected("0.9.1") and not _xla.affected("1.10.0")


def test_batched_vjp_rows_of_a_layernorm_equal_the_per_sample_rows():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", REPRO], capture_output=True, text=True, env=env, timeout=120, check=True)
    diff, size, flags = out.stdout.split(maxsplit=2)
    assert _xla.WORKAROUND in flags
    assert float(size) > 1 and float(diff) == 0.0
