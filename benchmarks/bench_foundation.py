"""Descriptor engine (issue 2): psi + nu by projection (one linearization, k VJPs) against the
dense Jacobian on an MLP generator, and W A by one linearization against k separate VJP calls.

Run alone:  .venv/bin/python benchmarks/bench_foundation.py [--batch 16] [--rounds 5]
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
from common import side_by_side, table

from geomjobs.generators.mlp import mlp_apply, random_mlp
from geomjobs.geometry import exact_singular_values, local_rank, local_scaling, matrix_rank_rtol, orthonormal_rows
from geomjobs.geometry.spectrum import projected_singular_values

SMOKE = ["--d", "8", "--hidden", "16", "--n", "64", "--k", "12", "--batch", "2", "--rounds", "1"]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--d", type=int, default=64, help="latent dimension")
    ap.add_argument("--hidden", type=int, default=256, help="width of the two hidden layers")
    ap.add_argument("--n", type=int, default=3072, help="output dimension")
    ap.add_argument("--k", type=int, default=120, help="rows of W")
    return ap.parse_args(argv)


def measure(args) -> dict:
    d, n, k, batch = args.d, args.n, args.k, args.batch
    layers = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32))
              for w, b in random_mlp([d, args.hidden, args.hidden, n], seed=0)]
    g = lambda z: mlp_apply(layers, z, "relu")  # noqa: E731
    w = jnp.asarray(orthonormal_rows(k, n, seed=0, stream="W"), jnp.float32)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((batch, d)), jnp.float32)
    tol_proj, tol_dense = matrix_rank_rtol(k, d, np.float32), matrix_rank_rtol(n, d, np.float32)   # W A: k x d; A: n x d

    @jax.jit
    def proj(zb):
        s = jax.vmap(lambda x: projected_singular_values(g, x, w, chunk=k))(zb)
        return jax.vmap(lambda t: local_scaling(t, tol_proj))(s), jax.vmap(lambda t: local_rank(t, tol_proj))(s)

    @jax.jit
    def dense(zb):
        s = jax.vmap(lambda x: exact_singular_values(g, x))(zb)
        return jax.vmap(lambda t: local_scaling(t, tol_dense))(s), jax.vmap(lambda t: local_rank(t, tol_dense))(s)

    # k separate VJP calls: the generator is re-linearized for every row of W
    one_row = jax.jit(lambda x, wi: jax.vjp(g, x)[1](wi)[0])
    separate = lambda x: jnp.stack([one_row(x, w[i]) for i in range(k)])  # noqa: E731
    batched_rows = jax.jit(lambda x: jax.vmap(jax.vjp(g, x)[1])(w)[0])
    x0 = z[0]
    t = side_by_side({"projection": lambda: proj(z), "dense": lambda: dense(z)}, args.rounds, 3)
    t2 = side_by_side({"batched": lambda: batched_rows(x0), "separate": lambda: separate(x0)}, args.rounds, 3)
    np.testing.assert_allclose(batched_rows(x0), separate(x0), rtol=1e-4, atol=1e-5)
    psi_p, nu_p = (np.asarray(a) for a in proj(z))
    psi_d, nu_d = (np.asarray(a) for a in dense(z))
    if not all(np.isfinite(a).all() for a in (psi_p, nu_p, psi_d, nu_d)):
        raise RuntimeError(f"non-finite psi / nu: projection {psi_p}, {nu_p}; dense {psi_d}, {nu_d}")
    return {"d": d, "n": n, "k": k, "batch": batch, "hidden": args.hidden,
            "projection_sps": batch / t["projection"], "dense_sps": batch / t["dense"],
            "batched_s": t2["batched"], "separate_s": t2["separate"]}


def run(args) -> str:
    r = measure(args)
    k, d, n = r["k"], r["d"], r["n"]
    return "\n".join([
        f"### psi + nu: projection (k = {k}) against the dense Jacobian", "",
        f"MLP generator d = {d} -> {r['hidden']} -> {r['hidden']} -> n = {n} (ReLU, float32), batches of {r['batch']} "
        f"samples, medians of {args.rounds} interleaved rounds of 3 calls.", "",
        *table(["path", "samples/s", "ratio"], [
            [f"projection, one linearization, k = {k} VJPs", f"{r['projection_sps']:.1f}",
             f"{r['projection_sps'] / r['dense_sps']:.2f} x dense"],
            [f"dense Jacobian (jacfwd, {d} JVPs) + SVD of {n} x {d}", f"{r['dense_sps']:.1f}", "1.00"]]), "",
        f"### W A by one linearization against {k} separate VJP calls (one sample)", "",
        *table(["path", "ms/sample", "speed-up"], [
            [f"one `jax.vjp`, {k} cotangents vmapped", f"{r['batched_s'] * 1e3:.2f}",
             f"{r['separate_s'] / r['batched_s']:.1f} x"],
            [f"{k} jitted calls of `jax.vjp(g, z)[1](w_i)`", f"{r['separate_s'] * 1e3:.2f}", "1.0"]]),
    ])


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
