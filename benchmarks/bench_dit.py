"""Memory plan of psi + nu (projection, k = 120) and delta (P = 4) per sample on DiT-XL/2 at
256 x 256 (latent 4 x 32 x 32, d = n = 4096): diffusers' DiTTransformer2DModel shape (depth 28,
hidden 1152, 16 heads, patch 2 -> 256 tokens, learned sigma, 1000 classes) through the same
generator code as ``kind: dit`` (geomjobs.generators.dit_folder.dit_from_module): x0 prediction at
t = 0 for class 0, with classifier-free guidance (two branches, ``cfg_scale`` != 1) or without.

The programs are the job's own step: the plan comes from the runner's planning
(``geomjobs.runner.plan.resolve`` of a job spec on this generator) and the step from
``geomjobs.runner.step.make_step`` at each chunk, compiled (never run) with the params and the
latent batch as ShapeDtypeStructs; XLA's memory analysis gives temporaries + arguments + outputs
(``engine.program_bytes``, what ``chunk: auto`` compares with the device budget). psi + nu is
planned on ShapeDtypeStruct params (nothing allocated); delta's planning traces the model once (its
sites), so for delta the params exist as zeros.

On two CPU cores each 28-block program compiles in 20-60 s, so the full model is compiled; depths
2 and 4 are compiled too, and the line a + b x depth through them is compared with depth 28 in the
notes: how far a plan measured on a few blocks extrapolates (``--depths 2 4`` alone extrapolates to
``--target-depth``, default the config's 28).

    python benchmarks/bench_dit.py                                   # bfloat16, depths 2, 4, 28, cfg 4 and 1
    python benchmarks/bench_dit.py --depths 28 --dtypes float32 --cfg 4
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import fmt_flops, gib, machine, table, xla_cost

from geomjobs import diffusion
from geomjobs.generators.diffusers import Numerics
from geomjobs.generators.dit_folder import dit_from_module
from geomjobs.generators.dit_layout import DiTConfig, DiTTransformer2D, param_shapes
from geomjobs.latents import build_latents
from geomjobs.runner.plan import resolve
from geomjobs.runner.step import make_step
from geomjobs.spec import validate_spec

XL = DiTConfig()                 # DiT-XL/2-256: 16 x 72 = 1152 hidden, 28 blocks, 32 x 32 x 4 latents, learned sigma
TINY = DiTConfig(num_attention_heads=2, attention_head_dim=16, num_layers=1, sample_size=8, num_embeds_ada_norm=10)
CONFIGS = {"xl": XL, "tiny": TINY}
SMOKE = ["--config", "tiny", "--depths", "1", "2", "--dtypes", "float32", "--k", "4", "--chunks", "4", "--cfg", "4"]


def dit_generator(cfg: DiTConfig, depth: int, dtype: str, cfg_scale: float | None, concrete: bool, remat: str = "none"):
    """The ``kind: dit`` generator of ``cfg`` at ``depth`` blocks, params in ``dtype``: ShapeDtypeStructs
    (nothing allocated), or zeros where the planner traces the model (delta's sites)."""
    cfg = dataclasses.replace(cfg, num_layers=depth)
    params = param_shapes(cfg, jnp.dtype(dtype))
    if concrete:
        params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params)
    return dit_from_module(DiTTransformer2D(cfg), params, 0, cfg_scale, 0, diffusion.abar(diffusion.DEFAULT_SCHEDULE), "x0",
                           Numerics(compute=jnp.dtype(dtype), remat=remat), model_id=f"dit-depth{depth}")


def plan_for(gen, descriptors: dict, cfg_scale):
    """The job's plan on ``gen`` (the runner's own planning); the model section records what was built."""
    model = {"kind": "dit", "path": "(zero weights)", "class_label": 0, "timestep": 0, "prediction": "x0"}
    if cfg_scale is not None:
        model["cfg_scale"] = cfg_scale
    spec = validate_spec({"model": model, "latents": {"kind": "gaussian", "count": 1, "shape": list(gen.latent_shape)},
                          "descriptors": descriptors, "execution": {"batch_size": 1}})
    return resolve(spec, gen, build_latents(spec["latents"]))


def compile_plan(plan, chunk):
    """(compiled step on abstract params, arrays and one latent; seconds to compile)."""
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)  # noqa: E731 - arrays or ShapeDtypeStructs
    arrays = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for k, v in plan.arrays.items()}
    args = (jax.tree_util.tree_map(sds, plan.generator.params), arrays,
            jax.ShapeDtypeStruct((1, plan.generator.latent_dim), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    t0 = time.perf_counter()
    c = make_step(plan, chunk).lower(*args).compile()
    return c, time.perf_counter() - t0


def forward_flops(gen) -> float:
    f = jax.jit(lambda p, z: gen.apply(p, z))
    sds = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), gen.params)
    return xla_cost(f.lower(sds, jax.ShapeDtypeStruct(gen.latent_shape, jnp.float32)).compile())[0]


def fit(depths, values, at: int):
    """Least-squares a + b x depth through (depths, values), evaluated at ``at``; (value, a, b)."""
    b, a = np.polyfit(np.asarray(depths, float), np.asarray(values, float), 1)
    return a + b * at, a, b


def run(args) -> str:
    base = CONFIGS[args.config]
    target = args.target_depth or base.num_layers
    k, P = args.k, args.directions
    progs = [("psi+nu", c) for c in args.chunks] + [("delta", None)]
    rows, notes, worst, fits32 = [], [], None, True
    for dt in args.dtypes:
        for s in args.cfg:
            scale = None if s == 1 else s
            per = {}
            for depth in args.depths:
                gens = {}
                for kind, chunk in progs:                    # delta last: its zero params are made only then
                    if (kind == "delta") not in gens:
                        gens[kind == "delta"] = dit_generator(base, depth, dt, scale, concrete=kind == "delta")
                    gen = gens[kind == "delta"]
                    desc = ({"local_scaling": {"mode": "projection", "k": k, "chunk": chunk}, "local_rank": {}} if kind == "psi+nu"
                            else {"local_complexity": {"directions": P, "radius": 1e-4}})
                    c, secs = compile_plan(plan_for(gen, desc, scale), chunk)
                    need = xla_cost(c)[1]
                    per.setdefault((kind, chunk), []).append((depth, need, secs))
                    print(f"[bench_dit] {dt} cfg {s} depth {depth} {kind} chunk {chunk}: {gib(need)} in {secs:.0f} s", file=sys.stderr)
                if depth == args.depths[-1]:
                    notes.append(f"{dt}, {'1 branch' if scale is None else '2 branches (CFG)'}: one forward pass at depth {depth} = "
                                 f"{fmt_flops(forward_flops(gens[False]))}FLOP (XLA's count)")
                del gens, gen
            for (kind, chunk), ms in per.items():
                depths, needs, secs = zip(*ms)
                name = f"delta, P = {P}" if kind == "delta" else f"psi+nu, chunk {min(chunk, k)}"
                measured = " / ".join(gib(n) for n in needs)
                if None in needs:
                    est, fits = "n/a", "n/a"
                elif target in depths:
                    est = needs[depths.index(target)]
                    fits = "yes" if est / 2**30 <= args.capacity_gib else "no"
                else:
                    est = fit(depths, needs, target)[0] if len(depths) > 1 else None
                    fits = "n/a" if est is None else ("yes" if est / 2**30 <= args.capacity_gib else "no")
                branches = "1" if scale is None else "2 (cfg)"
                if isinstance(est, (int, float)) and (worst is None or est > worst[0]):
                    worst = (est, f"{name}, {dt}, {'1 branch' if scale is None else 'CFG (2 branches)'}")
                fits32 = fits32 and (kind != "psi+nu" or min(chunk, k) != 32 or fits == "yes")
                rows.append([dt, branches, name, measured, gib(None if est in (None, "n/a") else int(est)), fits,
                             " / ".join(f"{x:.0f}" for x in secs)])
                if len(depths) > 2 and None not in needs:
                    pred = fit(depths[:-1], needs[:-1], depths[-1])[0]
                    notes.append(f"{dt} {branches} {name}: the fit through depths {list(depths[:-1])} predicts "
                                 f"{gib(int(pred))} at depth {depths[-1]}, measured {gib(needs[-1])}")
    dev = jax.devices()[0]
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(param_shapes(dataclasses.replace(base, num_layers=target))))
    if worst is not None:
        sizes = ", ".join(f"{dt} {gib(n_params * jnp.dtype(dt).itemsize)}" for dt in args.dtypes)
        notes.append(f"Largest plan at depth {target}: {worst[1]}, {gib(int(worst[0]))}; the parameters alone: {sizes}. "
                     + ("`chunk: auto` (first try 32 on an accelerator) keeps 32: its plan fits." if fits32 else
                        "The chunk-32 plan does not fit everywhere: `chunk: auto` halves it until it does."))
    notes.append("Command: `python benchmarks/bench_dit.py" + "".join(f" {a}" for a in args.argv) + "`.")
    what = ("DiT-XL/2 at 256 x 256 (diffusers DiTTransformer2DModel: hidden 1152, 16 heads, patch 2 -> 256 tokens, learned "
            "sigma, 1000 classes" if args.config == "xl" else f"a tiny DiT ({base}")
    return "\n".join([
        f"{what}; {n_params / 1e6:.0f}M parameters at depth {target}) through the `kind: dit` generator: x0 prediction at "
        f"t = 0, latent {base.in_channels} x {base.sample_size} x {base.sample_size} (d = n = {base.in_channels * base.sample_size ** 2}); "
        f"psi + nu by projection with k = {k}, delta with P = {P}; one sample per program, each the job's own step "
        f"(`runner.plan.resolve` + `runner.step.make_step`) compiled for {dev.platform.upper()} ({machine()}) with the "
        f"params and latent as ShapeDtypeStructs, never run. Measured at depths {list(args.depths)}; `depth {target}` is "
        f"{'measured' if target in args.depths else 'the least-squares line a + b x depth through them'}; `fits`: <= "
        f"{args.capacity_gib:g} GiB (one H100 80 GB).", "",
        *table(["dtype", "branches", "program", f"XLA plan at depths {' / '.join(map(str, args.depths))}",
                f"depth {target}", "fits", "compile s"], rows), "",
        *[f"- {x}" for x in notes],
        "- Plan = temporaries + arguments + outputs (`engine.program_bytes`). Each block adds the same parameters and the "
        "same saved activations, so the plan grows about linearly in depth (the fit notes say how closely XLA's buffer "
        "assignment follows that); the VJP chunk sets how many cotangents go through the backward pass at once.",
        "- Compiled for the CPU: XLA:CPU's buffer assignment. A GPU compile fuses differently; re-run on the accelerator "
        "(`python benchmarks/bench_dit.py --depths 28`) before trusting a chunk near the limit. `chunk: auto` starts at 32 "
        "on an accelerator and halves until the plan fits.",
    ])


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="xl", help="DiT-XL/2-256's sizes, or a tiny DiT (the smoke run)")
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4, 28],
                    help="blocks compiled; without --target-depth among them, the plan is extrapolated to it")
    ap.add_argument("--target-depth", type=int, default=None, help="default: the config's (28)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16"], help="params and activations (the cluster spec's: bfloat16)")
    ap.add_argument("--cfg", type=float, nargs="+", default=[4.0, 1.0], help="cfg_scale values (1: no null branch)")
    ap.add_argument("--k", type=int, default=120)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 16, 32, 60, 120])
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--capacity-gib", type=float, default=78.0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    print(run(parse()))
