"""psi + nu (projection, k = 120) and delta (P = 4) per sample on a Stable-Diffusion-1.x-shaped VAE
decoder: the real architecture and sizes (FlaxAutoencoderKL with block_out_channels (128, 256,
512, 512), layers_per_block 2, latent_channels 4, norm_num_groups 32), random weights built from
the config (nothing downloaded), through the same generator code as ``kind:
diffusers-vae-decoder`` (geomjobs.generators.diffusers.vae_decoder_from_module).

The programs measured are the job's own step: the plan comes from the runner's planning
(``geomjobs.runner.plan.resolve`` of a job spec, on the random-weight generator) and the step from
``geomjobs.runner.step.make_step`` at each chunk, exactly what a job's engine compiles. Per sample
(seconds are medians of interleaved rounds, after compilation):
* psi + nu: one ``jax.vjp`` linearization, k VJP rows in chunks of ``chunk`` cotangents
  (``lax.map`` over chunks, ``vmap`` inside), the k x d SVD and psi/nu; side by side for several
  chunk sizes and remat policies;
* delta: local_complexity with P directions (2P forward passes through the jaxpr interpreter);
* FLOPs of each compiled program from XLA's cost analysis, and the achieved FLOP/s (over the
  device's peak where known). XLA's HLO cost analysis counts a while-loop body ONCE, so for
  chunked programs (lax.map is a while loop) the count is modelled from the unchunked program's;
* XLA's memory plan of each compiled program (temporaries + arguments + outputs, as the engine
  counts it for ``chunk: auto``), which is what chunking and remat trade against time. A program
  whose plan exceeds the engine's memory budget (``GEOMJOBS_MEMORY_BUDGET_GIB``, else 90 % of the
  device's) is reported, not run.

Runs at a reduced resolution on a CPU (default latent 4 x 4 x 4 -> a 32 x 32 image: the decoder
has the same layers and channels, every spatial size is 16x smaller than at 512 x 512) and at
full size on a GPU: ``--latent 64`` (4 x 64 x 64 -> 3 x 512 x 512), ``--dtypes bfloat16`` (bf16
params and activations, float32 cotangents, VJP rows and SVD). ``--config tiny`` swaps in the
tests' tiny VAE and UNet (seconds; the smoke run).

    python benchmarks/bench_sd.py                          # CPU, 32 x 32, float32
    python benchmarks/bench_sd.py --latent 64 --dtypes bfloat16 float32   # one GPU, 512 x 512
"""
from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from common import fmt_flops, gib, interleaved, machine, medians, table, xla_cost

from geomjobs import diffusion
from geomjobs.generators.diffusers import Conditioning, Numerics, Target, random_params, unet_from_module, vae_decoder_from_module
from geomjobs.latents import build_latents
from geomjobs.runner.engine import memory_budget
from geomjobs.runner.plan import resolve
from geomjobs.runner.step import make_step
from geomjobs.spec import validate_spec

SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
               layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
# tiny models, the same code paths in seconds: a one-block VAE (its mid block keeps the attention)
# and the tests' UNet (tests/diffusers_tiny.py; diffusers' UNet blocks need 32 channels per group)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                block_out_channels=(4,), layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=4)
TINY_UNET = dict(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(32,), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                 attention_head_dim=2, cross_attention_dim=8)
CONFIGS = {"sd": (SD_VAE, SD_UNET, 77), "tiny": (TINY_VAE, TINY_UNET, 5)}   # vae, unet, prompt tokens
# dense peak FLOP/s by device kind (substring of jax's device_kind) and dtype
PEAKS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
         "A100": {"bfloat16": 312e12, "float32": 19.5e12}, "TPU v3": {"bfloat16": 123e12, "float32": 123e12}}
PAPER = {"psi_nu_s": 3.93, "delta_s": 0.113}     # Humayun et al. 2025, TPUv3, 512 x 512
H100_TARGET = {"psi_nu_s": 0.6, "delta_s": 0.03}
# one program of each kind (XLA:CPU takes seconds to compile each even at these sizes, ~10 s for a
# chunked one); the UNet's memory plan (~20 s of compiles for the tiny UNet) is left out
SMOKE = ["--config", "tiny", "--latent", "2", "--k", "4", "--chunks", "4", "--remat", "none", "--rounds", "1",
         "--plan-latent", "2", "--plan-dtypes", "float32", "--plan-chunks", "4", "--plan-remat", "--unet-plan-latent", "0"]


def _quiet():
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")


def sd_vae(config: dict, latent: int, seed: int = 0):
    """(FlaxAutoencoderKL module, random float32 decoder params) of the VAE ``config``.

    Shapes from ``jax.eval_shape`` of the decoder's init (no FLOPs); kernels N(0, 1/fan_in),
    biases 0, norm scales 1 (``random_params(..., spread=0)``). Only the decoder half is built
    (the encoder never enters G)."""
    from diffusers import FlaxAutoencoderKL

    _quiet()
    vae = FlaxAutoencoderKL(**config)
    shapes = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, latent, latent, 4)), method=vae.decode)["params"])
    return vae, random_params(shapes, seed, spread=0.0)


def vae_generator(vae, params, latent: int, dtype: str, remat: str):
    """The decoder as a geomjobs Generator, exactly as ``kind: diffusers-vae-decoder`` builds it."""
    return vae_decoder_from_module(vae, params, (4, latent, latent), Numerics(compute=jnp.dtype(dtype), remat=remat),
                                   model_id="sd-vae-random")


def unet_generator(config: dict, tokens: int, latent: int, dtype: str, timestep: int = 400):
    """The UNet ``config`` (random weights) as the ``diffusers-unet`` generator: x0 prediction at
    ``timestep`` (abar of SD's scaled_linear schedule), one all-zero prompt of ``tokens`` tokens."""
    from diffusers import FlaxUNet2DConditionModel

    _quiet()
    unet = FlaxUNet2DConditionModel(**{**config, "sample_size": latent})
    dim = config["cross_attention_dim"]
    shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, latent, latent)),
                                              jnp.zeros((1,), jnp.int32), jnp.zeros((1, tokens, dim)))["params"])
    abar = diffusion.alphas_cumprod(diffusion.betas("scaled_linear", 1000, 0.00085, 0.012))[timestep]
    return unet_from_module(unet, random_params(shapes, spread=0.0), Conditioning(np.zeros((1, tokens, dim), np.float32)),
                            Target((4, latent, latent), timestep, float(abar), prediction="x0"),
                            Numerics(compute=jnp.dtype(dtype)), model_id="sd-unet-random")


def plan_for(gen, descriptors: dict, batch: int):
    """The job's plan for ``descriptors`` on generator ``gen`` (the runner's own planning); the
    model section only records what was built here."""
    kind = "diffusers-vae-decoder" if gen.timestep is None else "diffusers-unet"
    model = {"kind": kind, "path": "(random weights)", "latent_shape": list(gen.latent_shape)}
    if kind == "diffusers-unet":
        model.update(timestep=int(gen.timestep), prediction="x0", prompt_embeddings="(zeros)")
    spec = validate_spec({"model": model, "latents": {"kind": "gaussian", "count": batch, "shape": list(gen.latent_shape)},
                          "descriptors": descriptors, "execution": {"batch_size": batch}})
    return resolve(spec, gen, build_latents(spec["latents"]))


def psi_nu(k: int, chunk: int) -> dict:
    return {"local_scaling": {"mode": "projection", "k": k, "chunk": chunk}, "local_rank": {}}


def delta(P: int, radius: float) -> dict:
    return {"local_complexity": {"directions": P, "radius": radius}}


def latent_batch(gen, batch: int):
    return jnp.asarray(np.random.default_rng(0).standard_normal((batch, gen.latent_dim)), jnp.float32)


def step_args(plan, z, abstract: bool = False):
    """(params, arrays, z, t) of the job's step, as the engine passes them (arrays in float32);
    ``abstract``: the arrays' shapes only (for a program compiled, never run)."""
    arrays = {k: jnp.asarray(v, jnp.float32) for k, v in plan.arrays.items()}
    rest = (arrays, z, jnp.zeros((z.shape[0],), jnp.int32))
    if abstract:
        rest = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), rest)
    return (plan.generator.params, *rest)


def compiled(plan, chunk, args):
    """(compiled step, seconds to compile)."""
    t0 = time.perf_counter()
    c = make_step(plan, chunk).lower(*args).compile()
    return c, time.perf_counter() - t0


def forward_flops(gen, z) -> float:
    """XLA's FLOPs per sample of G alone (the reference the chunked programs are modelled from)."""
    f = jax.jit(jax.vmap(lambda p, x: gen.apply(p, x.reshape(gen.latent_shape)).reshape(-1), in_axes=(None, 0)))
    return xla_cost(f.lower(gen.params, z).compile())[0] / z.shape[0]


def warm_up(variants: dict, info: dict, budget: int | None) -> dict[str, str]:
    """Call every compiled variant once and check its outputs are finite. A program whose XLA
    memory plan exceeds ``budget`` is not run; one that fails (out of memory at run time) is
    dropped. Returns {name: why} of the dropped ones, so a full-size run on one GPU reports
    "does not fit" for chunk = k instead of crashing."""
    failed = {}
    for name, fn in list(variants.items()):
        need = info[name]["bytes"]
        if budget and need and need > budget:
            failed[name] = f"not run: XLA plan {gib(need)} > budget {gib(budget)}"
        else:
            try:
                out = {k: np.asarray(v) for k, v in fn().items()}
            except Exception as e:  # noqa: BLE001 - RESOURCE_EXHAUSTED and friends
                failed[name] = f"failed: {str(e).splitlines()[0][:80]}"
            else:
                bad = [k for k, v in out.items() if not np.isfinite(v).all()]
                if bad:
                    raise RuntimeError(f"{name}: non-finite {bad} on random weights")
                info[name]["out"] = out
                continue
        print(f"[bench_sd] {name}: {failed[name]}", file=sys.stderr)
        del variants[name]
    return failed


def measure(args, vae, params32, dt: str, progs: list, peak) -> tuple[list, list]:
    """Rows (one per program) and notes of one dtype at latent ``args.latent``."""
    lat, k, bsz, P = args.latent, args.k, args.batch, args.directions
    gens = {r: vae_generator(vae, params32, lat, dt, r) for r in dict.fromkeys(r for r, _ in progs)}
    z = latent_batch(gens["none"], bsz)
    f_fwd = forward_flops(gens["none"], z)
    variants, info = {}, {}
    for remat, chunk in progs:
        name = f"psi+nu, chunk {chunk}" + (f", remat {remat}" if remat != "none" else "")
        plan = plan_for(gens[remat], psi_nu(k, chunk), bsz)
        a = step_args(plan, z)
        c, secs = compiled(plan, chunk, a)
        flops, need = xla_cost(c)
        info[name] = dict(remat=remat, chunk=chunk, raw=flops / bsz, bytes=need, compile=secs)
        variants[name] = lambda c=c, a=a: c(*a)
        print(f"[bench_sd] {dt} {name}: compiled in {secs:.0f} s", file=sys.stderr)
    vjp = (info[f"psi+nu, chunk {k}"]["raw"] - f_fwd) / k     # FLOPs of one VJP row (+ its SVD share)
    for v in info.values():
        trips = math.ceil(k / v["chunk"])
        # XLA counts a while-loop body once: model the chunked programs' FLOPs instead (the last
        # chunk is padded); remat full re-runs the forward pass in every chunk
        v["flops"] = (trips if v["remat"] == "full" else 1) * f_fwd + trips * v["chunk"] * vjp
    plan = plan_for(gens["none"], delta(P, args.radius), bsz)
    a = step_args(plan, z)
    c, secs = compiled(plan, None, a)
    flops, need = xla_cost(c)
    dname = f"delta, P = {P} ({2 * P} forward passes)"
    info[dname] = dict(flops=flops / bsz, bytes=need, compile=secs)
    variants[dname] = lambda c=c, a=a: c(*a)
    failed = warm_up(variants, info, memory_budget())   # one call each; drops what does not fit
    sec = {name: s / bsz for name, s in medians(interleaved(variants, args.rounds, warm=False)).items()}
    rows = []
    for name, v in info.items():
        cells = [dt, name]
        if name in failed:
            rows.append(cells + [failed[name], fmt_flops(v["flops"]) + "FLOP", "", "", gib(v["bytes"]), f"{v['compile']:.0f}"])
            continue
        rate = v["flops"] / sec[name]
        rows.append(cells + [f"{sec[name]:.3g}", fmt_flops(v["flops"]) + "FLOP", fmt_flops(rate) + "FLOP/s",
                             f"{100 * rate / peak:.0f} %" if peak else "n/a", gib(v["bytes"]), f"{v['compile']:.1f}"])
    ref = info[f"psi+nu, chunk {k}"].get("out")
    notes = [f"{dt}: one forward pass = {fmt_flops(f_fwd)}FLOP, one VJP row = {fmt_flops(vjp)}FLOP (XLA's count)"
             + (f"; peak used: {peak / 1e12:.0f} TFLOP/s" if peak else "")]
    if ref is not None:
        psi = [v["out"]["local_scaling"] for n, v in info.items() if n.startswith("psi") and "out" in v]
        dev = max(float(np.max(np.abs(p - ref["local_scaling"]) / np.abs(ref["local_scaling"]))) for p in psi)
        notes.append(f"{dt}: psi of every chunk / remat program against chunk {k}: max relative difference {dev:.1e}")
    return rows, notes


def run(args) -> str:
    dev = jax.devices()[0]
    dtypes = args.dtypes or (["float32"] if dev.platform == "cpu" else ["bfloat16", "float32"])
    lat, k, P = args.latent, args.k, args.directions
    vae_cfg = CONFIGS[args.config][0]
    up = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    d, n, img = 4 * lat * lat, 3 * (up * lat) ** 2, up * lat
    # (remat, chunk) programs: every chunk without remat, each other policy at --remat-chunk; the
    # unchunked program (chunk = k, no remat) is always there: it gives the per-VJP FLOP count
    progs = [("none", min(c, k)) for c in args.chunks] + [(r, min(args.remat_chunk, k)) for r in args.remat if r != "none"]
    progs = list(dict.fromkeys([("none", k)] + progs))
    vae, params32 = sd_vae(vae_cfg, lat)
    rows, notes = [], []
    for dt in dtypes:
        peak = args.peak_tflops * 1e12 if args.peak_tflops else next((p[dt] for m, p in PEAKS.items() if m in dev.device_kind), None)
        r, nt = measure(args, vae, params32, dt, progs, peak)
        rows += r
        notes += nt
    name = ("SD-1.x-shaped VAE decoder (FlaxAutoencoderKL, block_out_channels (128, 256, 512, 512), layers_per_block 2, "
            "GroupNorm 32, random weights)" if args.config == "sd"
            else f"tiny VAE decoder (block_out_channels {vae_cfg['block_out_channels']})")
    out = [
        f"{name} through the `diffusers-vae-decoder` generator, each program the job's own step (`runner.plan.resolve` + "
        f"`runner.step.make_step`): latent 4 x {lat} x {lat} -> image 3 x {img} x {img} (d = {d}, n = {n}); psi + nu by "
        f"projection with k = {k} (one linearization, k VJP rows in chunks, SVD in float32), delta with P = {P}, "
        f"r = {args.radius:g}; batch {args.batch}; {machine()}. Seconds per sample: medians of {args.rounds} interleaved "
        "rounds after compilation.", "",
        *table(["dtype", "program", "s/sample", "FLOP/sample", "achieved FLOP/s", "of peak", "XLA memory plan", "compile s"], rows),
        "", *[f"- {x}" for x in notes],
        "- FLOP/sample: XLA's cost analysis counts a while-loop (`lax.map`) body once, so chunked programs are modelled as "
        "forward + (rows computed, padding included) x (one VJP row, from the unchunked program), plus one forward per "
        "chunk under remat full. delta: XLA's count as is.",
        "- XLA memory plan: temporaries + arguments + outputs (`engine.program_bytes`, what `chunk: auto` compares with the "
        "engine's memory budget).",
        f"- Anchors at 512 x 512: the paper reports {PAPER['psi_nu_s']} s/sample (psi + nu) and {PAPER['delta_s']} s/sample "
        f"(delta) on TPUv3; the target on one H100 is <= {H100_TARGET['psi_nu_s']} s and <= {H100_TARGET['delta_s']} s.",
    ]
    if args.config == "sd" and lat != 64:
        scale = (64 / lat) ** 2
        out.append(f"- This run is at {img} x {img}: every activation is {scale:.0f}x smaller than at 512 x 512, so FLOPs grow "
                   f"about {scale:.0f}x at full size (the mid-block attention, quadratic in tokens, a little more). Full size "
                   "on a GPU: `python benchmarks/bench_sd.py --latent 64`.")
    if args.plan_latent:
        plat = args.plan_latent
        gens = {(dt, r): vae_generator(vae, params32, plat, dt, r) for dt in args.plan_dtypes for r in ("none", *args.plan_remat)}
        progs = [(dt, r, c) for dt in args.plan_dtypes for r, c in
                 [("none", c) for c in args.plan_chunks] + [(r, args.plan_remat_chunk) for r in args.plan_remat]]
        out += ["", f"### Memory plan at {up * plat} x {up * plat} (compiled, not run)", "",
                *memory_plan(gens, progs, args, f"the same programs at latent 4 x {plat} x {plat} -> 3 x {up * plat} x "
                                                f"{up * plat}")]
    if args.unet_plan_latent:
        ulat, dt = args.unet_plan_latent, args.plan_dtypes[0]
        t0 = time.perf_counter()
        gen = unet_generator(CONFIGS[args.config][1], CONFIGS[args.config][2], ulat, dt)
        print(f"[bench_sd] UNet built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(gen.params))
        out += ["", f"### Memory plan of the {args.config.upper()}-shaped UNet at latent 4 x {ulat} x {ulat} (compiled, not run)", "",
                *memory_plan({(dt, "none"): gen}, [(dt, "none", c) for c in args.unet_plan_chunks], args,
                             f"FlaxUNet2DConditionModel ({n_params / 1e6:.1f}M parameters, random weights) through the "
                             f"`diffusers-unet` generator: x0 prediction at t = 400, one all-zero prompt; d = n = "
                             f"{4 * ulat * ulat}"),
                "- `chunk: auto` starts at 32 on an accelerator and halves until the plan fits, so where 32 does not fit "
                "it lands on 16 or 8 by itself."]
    return "\n".join(out)


def memory_plan(gens: dict, progs: list, args, what: str) -> list[str]:
    """XLA's memory plan of the psi+nu programs ``progs`` ((dtype, remat, chunk)) and of delta
    (per dtype) on ``gens[(dtype, remat)]``, one sample per program, compiled but never run: does
    k = 120 fit on one accelerator, and at which chunk? Compiled for this machine's backend; on a
    CPU that is XLA:CPU's buffer assignment."""
    k, P, cap = args.k, args.directions, args.plan_capacity_gib
    rows, per_dt = [], {}
    for dt, remat, chunk in progs + [(dt, "delta", None) for dt in dict.fromkeys(p[0] for p in progs)]:
        gen = gens[(dt, "none" if remat == "delta" else remat)]
        plan = plan_for(gen, delta(P, args.radius) if remat == "delta" else psi_nu(k, chunk), 1)
        a = step_args(plan, latent_batch(gen, 1), abstract=True)
        c, secs = compiled(plan, chunk, a)
        flops, need = xla_cost(c)
        name = f"delta, P = {P}" if remat == "delta" else f"psi+nu, chunk {min(chunk, k)}" + (f", remat {remat}" if remat != "none" else "")
        if chunk is not None and chunk >= k and remat == "none":
            fwd = forward_flops(gen, jax.ShapeDtypeStruct((1, gen.latent_dim), jnp.float32))
            per_dt[dt] = (fwd, (flops - fwd) / k)
        fits = "n/a" if need is None else ("yes" if need / 2**30 <= cap else "no")
        rows.append([dt, name, gib(need), fits, f"{secs:.1f}"])
        print(f"[bench_sd] memory plan {dt} {name}: {secs:.0f} s", file=sys.stderr)
    dev = jax.devices()[0]
    out = [f"XLA's memory analysis of {what}, k = {k}, one sample per program, compiled for {dev.platform.upper()} "
           f"({dev.device_kind}). `fits` compares the plan (temporaries + arguments + outputs) with {cap:g} GiB (one H100 "
           "80 GB).", "", *table(["dtype", "program", "XLA memory plan", "fits", "compile s"], rows), ""]
    for dt, (fwd, vjp) in per_dt.items():
        out.append(f"- {dt}: one forward pass = {fmt_flops(fwd)}FLOP, one VJP row = {fmt_flops(vjp)}FLOP, so psi + nu with "
                   f"k = {k} is about {fmt_flops(fwd + k * vjp)}FLOP per sample (XLA's count).")
    if dev.platform == "cpu":
        out.append("- Compiled for the CPU: this is XLA:CPU's buffer assignment. A GPU compile fuses differently and adds cuDNN "
                   "workspace, and XLA:CPU may compute bfloat16 convolutions in float32, so read the bfloat16 rows as an upper "
                   "bound and re-run on the accelerator (`python benchmarks/bench_sd.py --latent 64`) before trusting a chunk "
                   "near the limit.")
    return out


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd", help="model sizes: SD 1.x, or the tests' tiny models")
    ap.add_argument("--latent", type=int, default=4, help="latent h = w (64 -> 512 x 512 images)")
    ap.add_argument("--k", type=int, default=120)
    ap.add_argument("--chunks", type=int, nargs="+", default=[8, 30, 120])
    ap.add_argument("--remat", nargs="+", default=["none", "full"], choices=["none", "dots", "full"],
                    help="remat policies to compare (each at --remat-chunk, 'none' at every chunk)")
    ap.add_argument("--remat-chunk", type=int, default=30)
    ap.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU, bfloat16 float32 on GPU")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--radius", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the dtype (default: a table)")
    ap.add_argument("--plan-latent", type=int, default=64,
                    help="also compile (not run) the programs at this latent size and report XLA's memory plan; 0: skip")
    ap.add_argument("--plan-dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--plan-chunks", type=int, nargs="+", default=[8, 16, 32, 60, 120])
    ap.add_argument("--plan-remat", nargs="*", default=["dots", "full"], choices=["dots", "full"],
                    help="remat policies of the memory plan (each at --plan-remat-chunk)")
    ap.add_argument("--plan-remat-chunk", type=int, default=32)
    ap.add_argument("--plan-capacity-gib", type=float, default=78.0)
    ap.add_argument("--unet-plan-latent", type=int, default=64,
                    help="also compile (not run) the UNet's programs at this latent size (dtype: the first of --plan-dtypes); 0: skip")
    ap.add_argument("--unet-plan-chunks", type=int, nargs="+", default=[8, 16, 32, 120])
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
