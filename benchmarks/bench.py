"""`make bench`: throughput figures, measured side by side in one run, written to BENCHMARKS.md.

Machines here are shared and noisy, so each comparison interleaves its variants (A, B, A, B,
...) and reports medians and the ratio; absolute times mean something only on a quiet GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs.generators.mlp import mlp_apply, random_mlp
from geomjobs.geometry import exact_singular_values, local_rank, local_scaling, orthonormal_rows
from geomjobs.geometry.spectrum import projected_singular_values


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return (f"{dev.platform.upper()} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}; "
            f"Python {platform.python_version()}, jax {jax.__version__}")


def timed(fn, *args, repeats: int):
    """Seconds per call of a compiled fn, one sample per repeat (after a warm-up call)."""
    jax.block_until_ready(fn(*args))
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def side_by_side(variants: dict, rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each variant, measured in interleaved rounds."""
    times = {k: [] for k in variants}
    for fn, args in variants.values():
        jax.block_until_ready(fn(*args))  # compile everything first
    for _ in range(rounds):
        for k, (fn, args) in variants.items():
            times[k] += timed(fn, *args, repeats=repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_projection_vs_dense(batch: int, rounds: int):
    d, n, k = 64, 3072, 120
    layers = [(jnp.asarray(w, jnp.float32), jnp.asarray(b, jnp.float32)) for w, b in random_mlp([d, 256, 256, n], seed=0)]
    g = lambda z: mlp_apply(layers, z, "relu")  # noqa: E731
    w = jnp.asarray(orthonormal_rows(k, n, seed=0, stream="W"), jnp.float32)
    z = jnp.asarray(np.random.default_rng(0).standard_normal((batch, d)), jnp.float32)

    def proj(zb):
        s = jax.vmap(lambda x: projected_singular_values(g, x, w, chunk=k))(zb)
        return jax.vmap(lambda t: local_scaling(t, k, d))(s), jax.vmap(lambda t: local_rank(t, k, d))(s)

    def dense(zb):
        s = jax.vmap(lambda x: exact_singular_values(g, x))(zb)
        return jax.vmap(lambda t: local_scaling(t, n, d))(s), jax.vmap(lambda t: local_rank(t, n, d))(s)

    # k separate VJP calls: the generator is re-linearized for every row of W.
    one_row = jax.jit(lambda x, wi: jax.vjp(g, x)[1](wi)[0])

    def separate(x):
        return jnp.stack([one_row(x, w[i]) for i in range(k)])

    batched_rows = jax.jit(lambda x: jax.vmap(jax.vjp(g, x)[1])(w)[0])
    x0 = z[0]
    t = side_by_side({"projection": (jax.jit(proj), (z,)), "dense": (jax.jit(dense), (z,))}, rounds, 3)
    t2 = side_by_side({"batched": (batched_rows, (x0,)), "separate": (separate, (x0,))}, rounds, 3)
    np.testing.assert_allclose(batched_rows(x0), separate(x0), rtol=1e-4, atol=1e-5)
    return {"d": d, "n": n, "k": k, "batch": batch,
            "projection_sps": batch / t["projection"], "dense_sps": batch / t["dense"],
            "batched_s": t2["batched"], "separate_s": t2["separate"]}


def foundation_section(args) -> str:
    r = bench_projection_vs_dense(args.batch, args.rounds)
    return "\n".join([
        f"### psi + nu: projection (k = {r['k']}) against the dense Jacobian", "",
        f"MLP generator d = {r['d']} -> 256 -> 256 -> n = {r['n']} (ReLU, float32), batches of {r['batch']} samples.", "",
        "| path | samples/s | ratio |", "|---|---|---|",
        f"| projection, one linearization, k = {r['k']} VJPs | {r['projection_sps']:.1f} | "
        f"{r['projection_sps'] / r['dense_sps']:.2f} x dense |",
        f"| dense Jacobian (jacfwd, {r['d']} JVPs) + SVD of {r['n']} x {r['d']} | {r['dense_sps']:.1f} | 1.00 |", "",
        f"### W A by one linearization against {r['k']} separate VJP calls (one sample)", "",
        "| path | ms/sample | speed-up |", "|---|---|---|",
        f"| one `jax.vjp`, {r['k']} cotangents vmapped | {r['batched_s'] * 1e3:.2f} | "
        f"{r['separate_s'] / r['batched_s']:.1f} x |",
        f"| {r['k']} jitted calls of `jax.vjp(g, z)[1](w_i)` | {r['separate_s'] * 1e3:.2f} | 1.0 |",
    ])


TABLE = {
    "foundation": ("Descriptor engine (issue 2)", None),
    "ray": ("Ray pipeline overhead (issue 3)", "bench_ray"),
    "estimators": ("psi estimators: error, rank correlation and cost (issue 4)", "estimators"),
    "sd": ("Stable-Diffusion-shaped VAE decoder (issue 4)", "bench_sd"),
    "generation": ("Generation as a job: samplers, sampled and trajectory jobs (issue 9)", "bench_generation"),
    "reward": ("Reward model: training throughput and guided sampling (issue 10)", "bench_reward"),
    "fisher": ("Fisher metric: Ising sampler and pipeline (issue 12)", "bench_fisher"),
    "scale": ("Jobs at scale: a million latents, manifests of 10k-40k shards (issue 13)", "bench_scale"),
}


def sections(names):
    """(title, run(args) -> markdown, parse(argv) -> args) of each benchmark section."""
    import importlib

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for name in names:
        title, module = TABLE[name]
        if module is None:
            yield name, title, foundation_section, None
            continue
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            print(f"skipping section {name}: {e}", file=sys.stderr)
            continue
        yield name, title, mod.run, mod.parse


ALL = list(TABLE)


def previous_sections(path: str) -> dict[str, str]:
    """The text of each section (title line to the next section) in an existing BENCHMARKS.md."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return {}
    out, title, body = {}, None, []
    for line in text.splitlines():
        if line.startswith("## "):
            if title:
                out[title] = "\n".join(body).rstrip() + "\n"
            title, body = line[3:].strip(), []
        elif title:
            body.append(line)
    if title:
        out[title] = "\n".join(body).rstrip() + "\n"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="BENCHMARKS.md")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--only", nargs="+", default=ALL,
                    help="sections to run (default: all); the others keep their text from the existing --out file")
    args = ap.parse_args(argv)
    cmd = "make bench  # " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    lines = [
        "# Benchmarks", "",
        f"Last written by `{cmd}` on {when} at commit {rev}; a section run alone "
        "(`--only NAME`) replaces only its own text.",
        f"Machine: {machine()}.", "",
        "Each comparison interleaves its variants in rounds and reports medians; the ratio is the figure",
        "to trust on a shared machine, absolute times only on a quiet accelerator.",
        *(["Every figure here is from the CPU named above (no accelerator)."] if jax.devices()[0].platform == "cpu" else []),
        "",
    ]
    fresh = {}
    for name, _title, run, parse in sections(args.only):
        t = time.perf_counter()
        body = run(args if parse is None else parse([]))
        fresh[name] = "\n".join(["", body, "", f"_(section `{name}`: {time.perf_counter() - t:.0f} s, "
                                             f"written {when} at {rev})_", ""])
        print(f"section {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    old = previous_sections(args.out)   # read at the end: sections written meanwhile by another run are kept
    for name in ALL:
        title = TABLE[name][0]
        if name in fresh:
            lines += [f"## {title}", fresh[name]]
        elif title in old:   # kept from an earlier run: its own footer says when and at which commit
            lines += [f"## {title}", old[title]]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
