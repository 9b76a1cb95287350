"""Estimators of psi against the exact answer, on generators small enough for a dense Jacobian.

For each generator and N latents z ~ N(0, I), every estimator runs on the whole batch
(``jit(vmap(...))``, float32 as in jobs); the reference is the dense Jacobian in float64 and
NumPy's SVD. Reported per estimator:
- its target: exact psi over all min(n, d) singular values (exact, slq), exact psi of the top-k
  singular values (lanczos), or psi of W A (projection: exact by construction, a different
  quantity from psi(A), so only its rank correlation is comparable);
- the relative error |psi_est - psi_target| / |psi_target| over samples (median, max), and the
  absolute error per kept direction |psi_est - psi_target| / m (median) -- psi sums m logs, so
  this one does not blow up when psi crosses 0;
- Spearman's rank correlation of its psi with exact (full-spectrum) psi across samples, next to
  that of its target (the best it could do);
- cost: Jacobian-vector products per sample (JVPs + VJPs, after the one forward/linearisation
  every method pays) and milliseconds per sample, timed side by side: all estimators of one
  generator are interleaved in rounds and the median round is reported.

Run: ``python benchmarks/estimators.py [--samples 64] [--rounds 3] [--mlp 32-128-256:tanh ...]``; ``run(args)`` returns the
Markdown.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import machine, side_by_side, table  # noqa: E402

from geomjobs.generators.mlp import mlp_apply, random_mlp  # noqa: E402
from geomjobs.geometry import estimators as est  # noqa: E402
from geomjobs.geometry import local_scaling, matrix_rank_rtol, orthonormal_rows  # noqa: E402
from geomjobs.geometry.spectrum import exact_singular_values, projected_singular_values  # noqa: E402

# MLPs as SIZES:ACTIVATION, sizes d-...-n; in the last d > k = 120, so projection sketches A
GENERATORS = ["32-128-256:tanh", "64-256-512-784:relu", "256-512-784:tanh"]
SMOKE = ["--mlp", "6-12-10:tanh", "--samples", "4", "--rounds", "1", "--lanczos-k", "2",
         "--slq", "2x3"]


def spearman(a, b) -> float:
    from scipy.stats import spearmanr  # scipy comes with scikit-learn

    return float(spearmanr(a, b).statistic)


def spec_psi(s, rows, cols):
    s = np.asarray(s, np.float64)
    keep = s > s.max() * max(rows, cols) * np.finfo(np.float64).eps
    return np.log(s[keep]).sum(), int(keep.sum())


def estimators_for(d, n, layers32, act, args):
    """name -> (keys, target kind, k or None, matvecs per sample, batched fn z -> psi)."""
    g = lambda z: mlp_apply(layers32, z, act)  # noqa: E731
    c = min(n, d)
    out = {}
    out["exact"] = ("dense Jacobian + SVD", "full", None, c if d <= n else n,
                    jax.vmap(lambda z: local_scaling(exact_singular_values(g, z), matrix_rank_rtol(n, d, np.float32))))
    k = min(120, n)
    w = jnp.asarray(orthonormal_rows(k, n, seed=0, stream="W"), jnp.float32)
    out["projection"] = (f"k={k}", "proj", k, k,
                         jax.vmap(lambda z: local_scaling(projected_singular_values(g, z, w, chunk=32),
                                                                matrix_rank_rtol(k, d, np.float32))))
    for kk in args.lanczos_k:
        steps = min(c, 2 * kk + 10)
        v0 = jnp.asarray(est.start_vector(c, 0), jnp.float32)
        out[f"lanczos k={kk}"] = (f"k={kk}, steps={steps}", "topk", kk, 2 * steps - 1, jax.vmap(
            lambda z, kk=kk, steps=steps, v0=v0: est.lanczos_descriptors(g, z, v0, k=kk, steps=steps)[1]))
    for probes, steps in args.slq:
        steps = min(c, steps)
        p = jnp.asarray(est.rademacher_probes(probes, c, 0), jnp.float32)
        out[f"slq {probes}x{steps}"] = (f"probes={probes}, steps={steps}", "full", None, probes * (2 * steps - 1), jax.vmap(
            lambda z, p=p, steps=steps: est.slq_log_volume(g, z, p, steps=steps).local_scaling))
    return out


def time_side_by_side(fns: dict, z, rounds: int) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(median seconds per batch call, values) of each fn, compiled and interleaved in rounds."""
    jitted = {k: jax.jit(f) for k, f in fns.items()}
    results = {k: np.asarray(jax.block_until_ready(f(z))) for k, f in jitted.items()}  # compile + values
    return side_by_side({k: (lambda f=f: f(z)) for k, f in jitted.items()}, rounds, warm=False), results


def bench_generator(mlp: str, args):
    sizes_s, act = mlp.split(":")
    sizes = [int(x) for x in sizes_s.split("-")]
    name = f"MLP {sizes_s} {act}"
    d, n = sizes[0], sizes[-1]
    layers64 = random_mlp(sizes, seed=1)
    layers32 = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)) for w, b in layers64]
    z64 = np.random.default_rng(2).standard_normal((args.samples, d))
    # exact reference in float64
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda z: mlp_apply([(jnp.asarray(w), jnp.asarray(b)) for w, b in layers64], z, act))))
    s_all = np.linalg.svd(np.asarray(jac(jnp.asarray(z64))), compute_uv=False)
    full = np.array([spec_psi(s, n, d) for s in s_all])
    psi_full, m_full = full[:, 0], full[:, 1]
    fns = estimators_for(d, n, layers32, act, args)
    secs, vals = time_side_by_side({k: v[4] for k, v in fns.items()}, jnp.asarray(z64, jnp.float32), args.rounds)
    rows = []
    for key, (keys, kind, k, mv, _) in fns.items():
        psi = vals[key].astype(np.float64)
        if kind == "full":
            target, m = psi_full, m_full
        elif kind == "topk":
            tk = np.array([spec_psi(s[:k], est.krylov_dim(n, d), d) for s in s_all])
            target, m = tk[:, 0], tk[:, 1]
        else:
            target, m = psi, np.full(len(psi), float(min(k, d)))  # exact by construction
        err = np.abs(psi - target)
        rel = err / np.abs(target)
        rows.append({
            "gen": f"{name} (d={d}, n={n})", "est": key.split(" ")[0], "keys": keys,
            "target": {"full": "psi, all singular values", "topk": f"psi of top-{k}", "proj": f"psi of W A ({k} x {d})"}[kind],
            "rel": "— (exact)" if kind == "proj" or key == "exact" else f"{np.median(rel):.1e} / {np.max(rel):.1e}",
            "abs": "—" if kind == "proj" or key == "exact" else f"{np.median(err / m):.1e}",
            "rho": spearman(psi, psi_full), "rho_t": spearman(target, psi_full),
            "mv": mv, "ms": 1e3 * secs[key] / args.samples,
        })
    return rows


def run(args) -> str:
    t0 = time.perf_counter()
    rows = []
    with jax.enable_x64(True):   # float64 references; the estimators run in float32
        for mlp in args.mlp:
            rows += bench_generator(mlp, args)
    lines = [
        f"psi estimators against the exact answer: {args.samples} samples z ~ N(0, I) per generator, "
        f"random He-initialised MLPs, estimators in float32 (reference: float64 dense Jacobian + NumPy SVD), "
        f"{machine()}; timings are medians of {args.rounds} interleaved rounds over the whole batch (jit + vmap), "
        "divided by the batch size.",
        "",
        *table(["generator", "estimator", "keys", "target", "rel. error vs target (median / max)",
                "abs. error per direction (median)", "Spearman vs exact psi", "Spearman of target vs exact psi",
                "JVP+VJP / sample", "ms / sample"],
               [[r["gen"], r["est"], r["keys"], r["target"], r["rel"], r["abs"], f"{r['rho']:.3f}", f"{r['rho_t']:.3f}",
                 r["mv"], f"{r['ms']:.2f}"] for r in rows]),
        "", f"(benchmark ran in {time.perf_counter() - t0:.0f} s)",
    ]
    return "\n".join(lines)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mlp", nargs="+", default=GENERATORS, help="generators, SIZES:ACTIVATION (e.g. 32-128-256:tanh)")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lanczos-k", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--slq", type=lambda s: tuple(int(x) for x in s.split("x")), nargs="+",
                    default=[(4, 10), (16, 10), (16, 30), (64, 30)], help="PROBESxSTEPS, e.g. 16x30")
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
