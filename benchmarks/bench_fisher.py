"""Fisher families (issue 12): Ising checkerboard spin updates per second in JAX (many chains batched
in one jitted loop) against a vectorised NumPy checkerboard with the same heat-bath rule, measured
side by side in interleaved rounds; the cluster update's and TASEP's rates for scale; and the wall
time of the whole `geomjobs fisher` Ising pipeline at its test size (tests/test_fisher_job.py's
tiny spec; ~180 compiles, so a minute or more on 2 cores: ``--no-pipeline`` leaves it out, as the
smoke run does).

Run alone:
    .venv/bin/python benchmarks/bench_fisher.py [--rounds 3] [--no-pipeline]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from common import side_by_side, table

# the cluster update's compile (~10 s) and the pipeline (~180 compiles) are left out of the smoke run;
# tests/test_fisher_*.py run both
SMOKE = ["--rounds", "1", "--L", "4", "--chains", "4", "--sweeps", "2", "--cluster-L", "--tasep-L", "4", "--no-pipeline"]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--L", type=int, default=32)
    ap.add_argument("--chains", type=int, default=256)
    ap.add_argument("--sweeps", type=int, default=50)
    ap.add_argument("--cluster-L", type=int, nargs="*", default=[8, 16], help="lattice sizes of the cluster update's rate")
    ap.add_argument("--tasep-L", type=int, default=32, help="lattice size of TASEP's rate")
    ap.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the whole fisher pipeline at its test size")
    return ap.parse_args(argv)


def numpy_sweeps(s, beta, h, sweeps, rng, table: bool):
    """The reference: vectorised NumPy checkerboard heat bath over a batch (C, L, L) of chains, with
    p_up from exp per spin or (table=True) from the same 5-entry table per chain as the JAX code."""
    L = s.shape[-1]
    i, j = np.indices((L, L))
    masks = [(i + j) % 2 == c for c in (0, 1)]
    b, hh = beta[:, None, None], h[:, None, None]
    tab = (1.0 / (1.0 + np.exp(-2.0 * (beta[:, None] * np.arange(-4, 5, 2)[None] + h[:, None])))).astype(np.float32)
    rows = np.arange(len(s))[:, None, None]
    for _ in range(sweeps):
        for m in masks:
            nb = np.roll(s, 1, -1) + np.roll(s, -1, -1) + np.roll(s, 1, -2) + np.roll(s, -1, -2)
            if table:
                p_up = tab[rows, ((nb + 4) // 2).astype(np.intp)]
            else:
                p_up = 1.0 / (1.0 + np.exp(-2.0 * (b * nb + hh)))
            new = np.where(rng.random(s.shape, np.float32) < p_up, 1.0, -1.0).astype(np.float32)
            s = np.where(m, new, s)
    return s


def numpy_packed(s, beta, h, sweeps, rng):
    """The reference with the JAX sweep's own algorithm: the two sublattices (L, L/2, C) with the
    chain axis minor (only the updated half is touched, no masks), neighbour sums by np.roll of
    the other sublattice, integer thresholds round(p * 2^32) gathered per chain, uint32 draws."""
    C, L, _ = s.shape
    t = np.moveaxis(s, 0, -1).astype(np.int8)
    odd = (np.arange(L) % 2 == 1)[:, None, None]
    ev, od = t[:, 0::2], t[:, 1::2]
    a = [np.where(odd, od, ev), np.where(odd, ev, od)]
    p = 1.0 / (1.0 + np.exp(-2.0 * (np.arange(-4, 5, 2)[:, None] * beta[None] + h[None])))
    thr = np.minimum(np.round(p * 2.0**32), 2.0**32 - 256).astype(np.uint32)   # (5, C)
    cidx = np.arange(C)
    for _ in range(sweeps):
        for c in (0, 1):
            b = a[1 - c]
            o = odd if c == 0 else ~odd
            nb = np.roll(b, 1, 0) + np.roll(b, -1, 0) + b + np.where(o, np.roll(b, -1, 1), np.roll(b, 1, 1))
            draw = rng.integers(0, 2**32, size=nb.shape, dtype=np.uint32)
            a[c] = np.where(draw < thr[(nb + 4) >> 1, cidx], np.int8(1), np.int8(-1))
    return a


def jax_runner(L, chains, sweeps, update):
    import jax.numpy as jnp

    from geomjobs.fisher import ising

    keys = ising.chain_keys(0, np.arange(chains), 1)
    beta = jnp.full(chains, 0.44, jnp.float32)
    h = jnp.zeros(chains, jnp.float32)

    def run():
        return np.asarray(ising._run_chains(keys, beta, h, jnp.int32(sweeps), jnp.int32(1), L=L, n_keep=1, update=update))

    run()  # compile
    return run


def spin_rates(args) -> list[str]:
    L, C, S = args.L, args.chains, args.sweeps
    rng = np.random.default_rng(0)
    s0 = np.where(rng.random((C, L, L)) < 0.5, 1.0, -1.0).astype(np.float32)
    beta, h = np.full(C, 0.44, np.float32), np.zeros(C, np.float32)
    jrun = jax_runner(L, C, S, "checkerboard")
    med = side_by_side({"jax": jrun, "numpy": lambda: numpy_sweeps(s0, beta, h, S, rng, True),
                        "numpy_exp": lambda: numpy_sweeps(s0, beta, h, S, rng, False),
                        "numpy_packed": lambda: numpy_packed(s0, beta, h, S, rng)}, args.rounds, warm=False)
    spins = C * L * L * S  # one update per spin per sweep (the JAX call also does its hot start)
    rj, rn, re, rp = (spins / med[k] for k in ("jax", "numpy", "numpy_exp", "numpy_packed"))
    lines = [
        f"Ising checkerboard heat bath, {C} chains of {L}x{L} at beta = 0.44, {S} sweeps per call, "
        f"median of {args.rounds} interleaved rounds:",
        "",
        *table(["implementation", "s per call", "spin updates / s"], [
            ["JAX (jit; sublattices (L, L/2, C), chains minor; counter-based uint32 draws)", f"{med['jax']:.3g}", f"{rj:.3g}"],
            ["NumPy, the same algorithm (sublattices, chains minor, uint32 thresholds)", f"{med['numpy_packed']:.3g}", f"{rp:.3g}"],
            ["NumPy, full lattice with checkerboard masks, 5-entry table per chain", f"{med['numpy']:.3g}", f"{rn:.3g}"],
            ["NumPy, full lattice with masks, exp per spin", f"{med['numpy_exp']:.3g}", f"{re:.3g}"]]),
        "",
        f"Ratio JAX / fastest NumPy variant: **{rj / max(rn, re, rp):.1f}x** (target >= 10x); JAX / NumPy with the "
        f"same algorithm {rj / rp:.1f}x, JAX / masked-lattice NumPy {rj / rn:.1f}x (table) and {rj / re:.1f}x (exp). "
        "Both run on this shared 2-core CPU, so the ratio measures XLA's fused loop against NumPy's temporaries "
        "and PCG64 draws, not an accelerator; a GPU run is not measured.",
        "",
    ]
    # for scale: the cluster update (Swendsen-Wang + one sweep) and TASEP, JAX only
    rows = []
    for Lc in args.cluster_L:
        t = side_by_side({"c": jax_runner(Lc, C, 10, "cluster")}, args.rounds, warm=False)["c"]
        rows.append([f"Ising cluster step (SW + sweep), L = {Lc}", C, f"{C * 10 / t:.3g} chain-steps / s"])
    import jax.numpy as jnp

    from geomjobs.fisher import ising, tasep

    Lt = args.tasep_L
    keys = ising.chain_keys(0, np.arange(C), 1)
    a = jnp.full(C, 0.3, jnp.float32)

    def trun():
        return np.asarray(tasep._run_chains(keys, a, a, jnp.int32(20), jnp.int32(1), L=Lt, n_keep=1)[0])

    t = side_by_side({"t": trun}, args.rounds)["t"]
    rows.append([f"TASEP sweep (L + 1 random-sequential micro-steps), L = {Lt}", C, f"{C * 21 / t:.3g} chain-sweeps / s"])
    return lines + [*table(["update", "chains", "rate"], rows), ""]


def pipeline() -> list[str]:
    from geomjobs.fisher import job as fjob

    spec = {"family": {"kind": "ising", "L": 4},
            "grid": {"low": [0.1, -0.2], "high": [0.5, 0.2], "resolution": [5, 5]},
            "samples_per_point": 64, "posterior": {"kind": "oracle"}, "potential": {"steps": 200},
            "geodesics": {"points": 9}, "execution": {"shard_size": 10}}
    out = tempfile.mkdtemp(prefix="gjbench-fisher-")
    os.environ["GEOMJOBS_LOCAL_MODE"] = "process"
    try:
        spec["output"] = os.path.join(out, "run")
        t = time.perf_counter()
        fjob.run_fisher(spec, progress=False)
        wall = time.perf_counter() - t
    finally:
        os.environ.pop("GEOMJOBS_LOCAL_MODE", None)
        shutil.rmtree(out, ignore_errors=True)
    return [f"Whole `geomjobs fisher` Ising pipeline at its test size (L = 4, 5x5 grid, 64 samples per point, "
            f"oracle posterior, 200 potential steps, in process, first run in this process so compiles "
            f"included): **{wall:.1f} s** wall."]


def run(args) -> str:
    return "\n".join(spin_rates(args) + (pipeline() if args.pipeline else ["Pipeline: not measured (`--no-pipeline`)."]))


if __name__ == "__main__":
    print(run(parse(sys.argv[1:])))
