"""psi + nu (projection, k = 120) and delta (P = 4) per sample on a Stable-Diffusion-1.x-shaped VAE
decoder: the real architecture and sizes (FlaxAutoencoderKL with block_out_channels (128, 256,
512, 512), layers_per_block 2, latent_channels 4, norm_num_groups 32), random weights built from
the config (nothing downloaded), through the same generator code as ``kind:
diffusers-vae-decoder`` (geomjobs.generators.diffusers.vae_decoder_from_module).

What is measured, per sample (seconds are medians of interleaved rounds, after compilation):
* psi + nu: one ``jax.vjp`` linearization, k VJP rows in chunks of ``chunk`` cotangents
  (``lax.map`` over chunks, ``vmap`` inside), the k x d SVD and psi/nu, i.e. what the job engine
  runs; side by side for several chunk sizes and remat policies;
* delta: local_complexity with P directions (2P forward passes through the jaxpr interpreter);
* FLOPs of each compiled program from XLA's cost analysis, and the achieved FLOP/s (over the
  device's peak where known). XLA's HLO cost analysis counts a while-loop body ONCE, so for
  chunked programs (lax.map is a while loop) the count is scaled here by the trip count; the
  unchunked program (chunk = k) needs no correction and is the reference;
* XLA's memory analysis of each compiled program (temporary buffers: activations, residuals,
  cotangent chunks), which is what chunking and remat trade against time.

Runs at a reduced resolution on a CPU (default latent 4 x 4 x 4 -> a 32 x 32 image: the decoder
has the same layers and channels, every spatial size is 16x smaller than at 512 x 512) and at
full size on a GPU: ``--latent 64`` (4 x 64 x 64 -> 3 x 512 x 512), ``--dtypes bfloat16`` (bf16
params and activations, float32 cotangents, VJP rows and SVD).

    python benchmarks/bench_sd.py                          # CPU, 32 x 32, float32
    python benchmarks/bench_sd.py --latent 64 --dtypes bfloat16 float32   # one GPU, 512 x 512
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from geomjobs import diffusion
from geomjobs.generators.diffusers import Conditioning, Numerics, Target, random_params, unet_from_module, vae_decoder_from_module
from geomjobs.geometry import local_rank, local_scaling, matrix_rank_rtol, orthonormal_rows
from geomjobs.geometry.spectrum import projected_singular_values

SD_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
              layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD_UNET = dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
               layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
# dense peak FLOP/s by device kind (substring of jax's device_kind) and dtype
PEAKS = {"H100": {"bfloat16": 989e12, "float32": 67e12}, "H200": {"bfloat16": 989e12, "float32": 67e12},
         "A100": {"bfloat16": 312e12, "float32": 19.5e12}, "TPU v3": {"bfloat16": 123e12, "float32": 123e12}}
PAPER = {"psi_nu_s": 3.93, "delta_s": 0.113}     # Humayun et al. 2025, TPUv3, 512 x 512
H100_TARGET = {"psi_nu_s": 0.6, "delta_s": 0.03}


def sd_vae(latent: int, seed: int = 0):
    """(FlaxAutoencoderKL module, random float32 decoder params) of the SD-1.x-shaped VAE.

    Shapes from ``jax.eval_shape`` of the decoder's init (no FLOPs); kernels N(0, 1/fan_in),
    biases 0, norm scales 1 (``random_params(..., spread=0)``). Only the decoder half is built
    (the encoder never enters G)."""
    import diffusers
    from diffusers import FlaxAutoencoderKL
    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vae = FlaxAutoencoderKL(**SD_VAE)
        shapes = jax.eval_shape(lambda: vae.init(jax.random.PRNGKey(0), jnp.zeros((1, latent, latent, 4)),
                                                 method=vae.decode)["params"])
    return vae, random_params(shapes, seed, spread=0.0)


def sd_unet(latent: int, dtype, timestep: int = 400):
    """The SD-1.x-shaped UNet (860M params, random weights) as the ``diffusers-unet`` generator:
    x0 prediction at ``timestep`` (abar of SD's scaled_linear schedule), one 77 x 768 prompt."""
    import diffusers
    from diffusers import FlaxUNet2DConditionModel

    diffusers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unet = FlaxUNet2DConditionModel(**{**SD_UNET, "sample_size": latent})
        shapes = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, latent, latent)),
                                                  jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, 768)))["params"])
    abar = diffusion.alphas_cumprod(diffusion.betas("scaled_linear", 1000, 0.00085, 0.012))[timestep]
    return unet_from_module(unet, random_params(shapes, spread=0.0), Conditioning(np.zeros((1, 77, 768), np.float32)),
                            Target((4, latent, latent), timestep, float(abar), prediction="x0"), Numerics(compute=dtype),
                            model_id="sd-unet-random")


def sd_vae_decoder(vae, params, latent: int, dtype, remat: str):
    """The decoder as a geomjobs Generator, exactly as ``kind: diffusers-vae-decoder`` builds it."""
    return vae_decoder_from_module(vae, params, (4, latent, latent), Numerics(compute=dtype, remat=remat),
                                   model_id="sd-vae-random")


def cost(compiled) -> tuple[float, int]:
    """(FLOPs, temporary bytes) of a compiled program by XLA's own analyses."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    flops = float((ca or {}).get("flops", float("nan")))
    try:
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        temp = -1
    return flops, temp


# Programs take params, W and B as arguments (as the job engine does): closed over, they become
# constants and XLA constant-folds the first VJP convolution of W against the output conv.

def forward_fn(gen):
    shape = gen.latent_shape
    return jax.jit(jax.vmap(lambda p, z: gen.apply(p, z.reshape(shape)).reshape(-1), in_axes=(None, 0)))


def psi_nu_fn(gen, chunk, *, one_trip_loop=False):
    """(params, w, z batch) -> (psi, nu): what the engine's step runs for mode projection.

    ``one_trip_loop``: all k rows in ONE ``lax.map`` iteration; the same arithmetic as chunk = k,
    inside a while loop, to separate the cost of the loop from the cost of smaller chunks."""
    apply, shape, d = gen.apply, gen.latent_shape, gen.latent_dim

    def one(p, w, z):
        g = lambda x: apply(p, x.reshape(shape)).reshape(-1)  # noqa: E731
        if one_trip_loop:
            out, vjp = jax.vjp(g, z)
            m = jax.lax.map(jax.vmap(lambda c: vjp(c)[0]), w.astype(out.dtype)[None])[0]
            s = jnp.linalg.svd(m, compute_uv=False)
        else:
            s = projected_singular_values(g, z, w, chunk=chunk)
        tol = matrix_rank_rtol(w.shape[0], d, s.dtype)
        return local_scaling(s, tol), local_rank(s, tol)

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))


def delta_fn(gen, radius):
    from geomjobs.geometry.complexity import local_complexity
    apply, shape = gen.apply, gen.latent_shape

    def one(p, b, z):
        return local_complexity(lambda x: apply(p, x), z.reshape(shape), b, radius)[0]

    return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))


def timed_rounds(variants: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each (already compiled) variant, interleaved A, B, C, A, B, C, ..."""
    times = {k: [] for k in variants}
    for _ in range(rounds):
        for k, (fn, args) in variants.items():
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[k].append(time.perf_counter() - t)
    return times


def plan_bytes(compiled) -> tuple[int, int]:
    """(temporaries, arguments + outputs - aliased) of a compiled program: XLA's memory plan."""
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes, m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


def plan_row(cells: list[str], temp: int, io: int, cap_gib: float, compile_s: float) -> str:
    """A memory-plan table row: the leading cells, then temp, io, whether it fits, compile time."""
    fits = "yes" if (temp + io) / 2**30 <= cap_gib else "no"
    return "| " + " | ".join([*cells, f"{temp / 2**30:.2f} GiB", f"{io / 2**30:.2f} GiB", fits, f"{compile_s:.0f}"]) + " |"


def device_limit(dev) -> int | None:
    """Bytes the device's allocator may hand out (None on a CPU, which reports no limit)."""
    try:
        return (dev.memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001
        return None


def warm_up(variants: dict, info: dict, limit: int | None) -> dict[str, str]:
    """Call every compiled variant once. A program whose XLA memory plan exceeds the device's
    limit is not run; one that fails (out of memory at run time) is dropped. Returns
    {name: why} of the dropped ones, so a full-size run on one GPU reports "does not fit" for
    chunk = k instead of crashing."""
    failed = {}
    for name, (fn, a) in list(variants.items()):
        temp = info[name]["temp"]
        if limit and temp > limit:
            failed[name] = f"not run: XLA plan {temp / 2**30:.1f} GiB > {limit / 2**30:.1f} GiB"
        else:
            try:
                jax.block_until_ready(fn(*a))
                continue
            except Exception as e:  # noqa: BLE001 - RESOURCE_EXHAUSTED and friends
                failed[name] = f"failed: {str(e).splitlines()[0][:80]}"
        print(f"[bench_sd] {name}: {failed[name]}", file=sys.stderr)
        del variants[name]
    return failed


def fmt_flops(x):
    for unit, s in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= s:
            return f"{x / s:.2f} {unit}"
    return f"{x:.0f} "


def run(args) -> str:
    dev = jax.devices()[0]
    platform = dev.platform
    dtypes = args.dtypes or (["float32"] if platform == "cpu" else ["bfloat16", "float32"])
    lat, k, bsz, P = args.latent, args.k, args.batch, args.directions
    d, n = 4 * lat * lat, 3 * (8 * lat) ** 2
    z = jnp.asarray(np.random.default_rng(0).standard_normal((bsz, d)), jnp.float32)
    w = jnp.asarray(orthonormal_rows(k, n, seed=0, stream="W"), jnp.float32)
    b = jnp.asarray(orthonormal_rows(P, d, seed=0, stream="B"), jnp.float32)

    def peak_for(dt):
        if args.peak_tflops:
            return args.peak_tflops * 1e12
        return next((p[dt] for name, p in PEAKS.items() if name in dev.device_kind), None)

    # (remat, chunk) programs: every chunk without remat, each other policy at --remat-chunk; the
    # unchunked program (chunk = k, no remat) is always there: it gives the per-VJP FLOP count
    progs = [("none", min(c, k)) for c in args.chunks] + [(r, min(args.remat_chunk, k)) for r in args.remat if r != "none"]
    progs = list(dict.fromkeys([("none", k)] + progs))
    vae, params32 = sd_vae(lat)
    rows, notes = [], []
    for dt in dtypes:
        dtype = jnp.dtype(dt)
        gens = {r: sd_vae_decoder(vae, params32, lat, dtype, r) for r in dict.fromkeys(r for r, _ in progs)}
        params = gens["none"].params
        fwd = forward_fn(gens["none"]).lower(params, z).compile()
        f_fwd = cost(fwd)[0] / bsz
        variants, info = {}, {}
        for remat, chunk in progs + ([("loop", k)] if args.loop_check else []):
            name = (f"psi+nu, chunk {chunk}" + (f", remat {remat}" if remat not in ("none", "loop") else "")
                    + (" in a 1-trip lax.map" if remat == "loop" else ""))
            t0 = time.perf_counter()
            fn = psi_nu_fn(gens["none"], None, one_trip_loop=True) if remat == "loop" else \
                psi_nu_fn(gens[remat], None if chunk >= k else chunk)
            c = fn.lower(params, w, z).compile()
            flops, temp = cost(c)
            info[name] = dict(remat=remat, chunk=chunk, raw=flops / bsz, temp=temp, compile=time.perf_counter() - t0)
            variants[name] = (c, (params, w, z))
            print(f"[bench_sd] {dt} {name}: compiled in {info[name]['compile']:.0f} s", file=sys.stderr)
        vjp = (info[f"psi+nu, chunk {k}"]["raw"] - f_fwd) / k     # FLOPs of one VJP row (+ its SVD share)
        for v in info.values():
            trips = 1 if v["remat"] == "loop" else math.ceil(k / v["chunk"])
            rows_done = trips * v["chunk"]                          # the last chunk is padded
            # XLA counts a while-loop body once: model the chunked programs' FLOPs instead;
            # remat full re-runs the forward pass in every chunk
            v["flops"] = (trips if v["remat"] == "full" else 1) * f_fwd + rows_done * vjp
        t0 = time.perf_counter()
        c = delta_fn(gens["none"], args.radius).lower(params, b, z).compile()
        flops, temp = cost(c)
        dname = f"delta, P = {P} ({2 * P} forward passes)"
        info[dname] = dict(flops=flops / bsz, temp=temp, compile=time.perf_counter() - t0)
        variants[dname] = (c, (params, b, z))
        limit = int(args.device_limit_gib * 2**30) if args.device_limit_gib else device_limit(dev)
        failed = warm_up(variants, info, limit)   # one call each; drops what does not fit
        times = timed_rounds(variants, args.rounds)
        peak = peak_for(dt)
        for name, v in info.items():
            if name in failed:
                rows.append((dt, name, None, v["flops"], failed[name], "", v["temp"], v["compile"]))
                continue
            sec = statistics.median(times[name]) / bsz
            rate = v["flops"] / sec
            rows.append((dt, name, sec, v["flops"], rate, f"{100 * rate / peak:.0f} %" if peak else "n/a",
                         v["temp"], v["compile"]))
        notes.append(f"{dt}: one forward pass = {fmt_flops(f_fwd)}FLOP, one VJP row = {fmt_flops(vjp)}FLOP (XLA's count)"
                     + (f"; peak used: {peak / 1e12:.0f} TFLOP/s" if peak else ""))

    img = 8 * lat
    out = [
        f"SD-1.x-shaped VAE decoder (FlaxAutoencoderKL, block_out_channels (128, 256, 512, 512), layers_per_block 2, "
        f"GroupNorm 32, random weights) through the `diffusers-vae-decoder` generator: latent 4 x {lat} x {lat} -> image "
        f"3 x {img} x {img} (d = {d}, n = {n}); psi + nu by projection with k = {k} (one linearization, k VJP rows in "
        f"chunks, SVD in float32), delta with P = {P}, r = {args.radius:g}; batch {bsz}; {platform.upper()} "
        f"({dev.device_kind}, {os.cpu_count()} cores), jax {jax.__version__}. Seconds per sample: medians of "
        f"{args.rounds} interleaved rounds after compilation.",
        "",
        "| dtype | program | s/sample | FLOP/sample | achieved FLOP/s | of peak | XLA temp memory | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for dt, name, sec, fl, rate, pk, temp, comp in rows:
        mem = f"{temp / 2**30:.2f} GiB" if temp >= 0 else "n/a"
        if sec is None:    # did not run: rate holds why
            out.append(f"| {dt} | {name} | {rate} | {fmt_flops(fl)} | | | {mem} | {comp:.0f} |")
            continue
        out.append(f"| {dt} | {name} | {sec:.3f} | {fmt_flops(fl)} | {fmt_flops(rate)}FLOP/s | {pk} | {mem} | {comp:.0f} |")
    out += ["", *[f"- {x}" for x in notes]]
    out.append("- FLOP/sample: XLA's cost analysis counts a while-loop (`lax.map`) body once, so chunked programs are "
               "modelled as forward + (rows computed, padding included) x (one VJP row, from the unchunked program), "
               "plus one forward per chunk under remat full. delta: XLA's count as is.")
    out.append(f"- Anchors at 512 x 512: the paper reports {PAPER['psi_nu_s']} s/sample (psi + nu) and {PAPER['delta_s']} "
               f"s/sample (delta) on TPUv3; the target on one H100 is <= {H100_TARGET['psi_nu_s']} s and "
               f"<= {H100_TARGET['delta_s']} s.")
    if lat != 64:
        scale = (64 / lat) ** 2
        out.append(f"- This run is at {img} x {img}: every activation is {scale:.0f}x smaller than at 512 x 512, so "
                   f"FLOPs grow about {scale:.0f}x at full size (the mid-block attention, quadratic in tokens, a "
                   f"little more). Full size on a GPU: `python benchmarks/bench_sd.py --latent 64`.")
    if args.loop_check:
        out.append(f"- `chunk {k} in a 1-trip lax.map` is the unchunked arithmetic inside a while loop: where it is as slow as "
                   "the chunked programs, the loop itself is the cost (XLA:CPU runs convolutions inside while loops on a "
                   "slow path, jax-ml/jax#12868); this is why `chunk: auto` is one pass on a CPU.")
    if args.plan_latent:
        out += ["", memory_plan(vae, params32, args)]
    if args.unet_plan_latent:
        out += ["", unet_memory_plan(args)]
    return "\n".join(out)


def memory_plan(vae, params32, args) -> str:
    """XLA's memory plan of the psi+nu and delta programs at latent ``args.plan_latent`` (64:
    512 x 512 images), compiled but never run: does k = 120 fit on one accelerator, and at which
    chunk? Compiled for this machine's backend; on a CPU that is XLA:CPU's buffer assignment."""
    lat, k, P = args.plan_latent, args.k, args.directions
    d, n = 4 * lat * lat, 3 * (8 * lat) ** 2
    dev = jax.devices()[0]
    z = jax.ShapeDtypeStruct((1, d), jnp.float32)
    w = jax.ShapeDtypeStruct((k, n), jnp.float32)
    b = jax.ShapeDtypeStruct((P, d), jnp.float32)
    rows, f_vjp = [], {}
    for dt in args.plan_dtypes:
        dtype = jnp.dtype(dt)
        progs = [("none", c) for c in args.plan_chunks] + [(r, args.plan_remat_chunk) for r in ("dots", "full")]
        gens = {}
        for remat, chunk in progs:
            gen = gens.setdefault(remat, sd_vae_decoder(vae, params32, lat, dtype, remat))
            t0 = time.perf_counter()
            c = psi_nu_fn(gen, None if chunk >= k else chunk).lower(gen.params, w, z).compile()
            if chunk >= k and remat == "none":
                f_fwd = cost(forward_fn(gen).lower(gen.params, z).compile())[0]
                f_vjp[dt] = (cost(c)[0] - f_fwd) / k, f_fwd
            rows.append((dt, f"psi+nu, chunk {min(chunk, k)}" + (f", remat {remat}" if remat != "none" else ""),
                         *plan_bytes(c), time.perf_counter() - t0))
            print(f"[bench_sd] memory plan {dt} {rows[-1][1]}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        gen = gens["none"]
        t0 = time.perf_counter()
        rows.append((dt, f"delta, P = {P}", *plan_bytes(delta_fn(gen, args.radius).lower(gen.params, b, z).compile()),
                     time.perf_counter() - t0))
    cap = args.plan_capacity_gib
    img = 8 * lat
    out = [f"### Memory plan at {img} x {img} (compiled, not run)", "",
           f"XLA's memory analysis of the same programs at latent 4 x {lat} x {lat} -> 3 x {img} x {img} (d = {d}, "
           f"n = {n}), k = {k}, one sample per program, compiled for {dev.platform.upper()} ({dev.device_kind}). "
           f"`fits` compares temporaries + arguments with {cap:g} GiB (one H100 80 GB).", "",
           "| dtype | program | XLA temp memory | arguments + outputs | fits | compile s |", "|---|---|---|---|---|---|"]
    out += [plan_row([dt, name], temp, io, cap, comp) for dt, name, temp, io, comp in rows]
    out.append("")
    for dt, (vjp, fwd) in f_vjp.items():
        out.append(f"- {dt}: one forward pass = {fmt_flops(fwd)}FLOP, one VJP row = {fmt_flops(vjp)}FLOP, so psi + nu "
                   f"with k = {k} is about {fmt_flops(fwd + k * vjp)}FLOP per sample (XLA's count).")
    if dev.platform == "cpu":
        out.append("- Compiled for the CPU: this is XLA:CPU's buffer assignment. A GPU compile fuses differently and adds "
                   "cuDNN workspace, and XLA:CPU may compute bfloat16 convolutions in float32, so read the bfloat16 rows "
                   "as an upper bound and re-run on the accelerator (`python benchmarks/bench_sd.py --latent 64`, whose "
                   "table has the device's own memory column) before trusting a chunk near the limit.")
    return "\n".join(out)


def unet_memory_plan(args) -> str:
    """The same memory plan for the SD-1.x-shaped UNet (``diffusers-unet``, x0 at t = 400): d = n =
    4 x lat x lat, so W is k x d; compiled, not run."""
    lat, k, P = args.unet_plan_latent, args.k, args.directions
    d = 4 * lat * lat
    dev = jax.devices()[0]
    dt = args.plan_dtypes[0]
    t0 = time.perf_counter()
    gen = sd_unet(lat, jnp.dtype(dt))
    print(f"[bench_sd] UNet built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    z = jax.ShapeDtypeStruct((1, d), jnp.float32)
    w = jax.ShapeDtypeStruct((k, d), jnp.float32)
    b = jax.ShapeDtypeStruct((P, d), jnp.float32)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(gen.params["unet"]))
    fwd = cost(forward_fn(gen).lower(gen.params, z).compile())[0]
    rows, vjp = [], None
    for chunk in args.unet_plan_chunks:
        t0 = time.perf_counter()
        c = psi_nu_fn(gen, None if chunk >= k else chunk).lower(gen.params, w, z).compile()
        if chunk >= k:
            vjp = (cost(c)[0] - fwd) / k
        rows.append((f"psi+nu, chunk {min(chunk, k)}", *plan_bytes(c), time.perf_counter() - t0))
        print(f"[bench_sd] UNet memory plan {rows[-1][0]}: {rows[-1][3]:.0f} s", file=sys.stderr)
    t0 = time.perf_counter()
    rows.append((f"delta, P = {P}", *plan_bytes(delta_fn(gen, args.radius).lower(gen.params, b, z).compile()),
                 time.perf_counter() - t0))
    cap = args.plan_capacity_gib
    out = [f"### Memory plan of the SD-1.x-shaped UNet at latent 4 x {lat} x {lat} (compiled, not run)", "",
           f"FlaxUNet2DConditionModel (block_out_channels (320, 640, 1280, 1280), cross-attention 768, "
           f"{n_params / 1e6:.0f}M parameters, random weights) through the `diffusers-unet` generator: x0 prediction at "
           f"t = 400, one 77 x 768 prompt, {dt} params and activations; d = n = {d}, k = {k}, one sample per program, "
           f"compiled for {dev.platform.upper()} ({dev.device_kind}); `fits`: temporaries + arguments <= {cap:g} GiB.", "",
           "| program | XLA temp memory | arguments + outputs | fits | compile s |", "|---|---|---|---|---|"]
    out += [plan_row([name], temp, io, cap, comp) for name, temp, io, comp in rows]
    out.append("")
    out.append(f"- One forward pass = {fmt_flops(fwd)}FLOP" + (f", one VJP row = {fmt_flops(vjp)}FLOP, so psi + nu with "
               f"k = {k} is about {fmt_flops(fwd + k * vjp)}FLOP per sample" if vjp else "") + " (XLA's count).")
    out.append("- `chunk: auto` starts at 32 on an accelerator and halves until the plan fits, so where 32 does not fit "
               "it lands on 16 or 8 by itself.")
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--device-limit-gib", type=float, default=None,
                    help="skip programs whose XLA memory plan exceeds this (default: the device's allocator limit)")
    ap.add_argument("--loop-check", action=argparse.BooleanOptionalAction, default=True,
                    help="also time chunk = k inside a one-trip lax.map (the cost of the loop itself)")
    ap.add_argument("--plan-latent", type=int, default=64,
                    help="also compile (not run) the programs at this latent size and report XLA's memory plan; 0: skip")
    ap.add_argument("--plan-dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--plan-chunks", type=int, nargs="+", default=[8, 16, 32, 60, 120])
    ap.add_argument("--plan-remat-chunk", type=int, default=32)
    ap.add_argument("--plan-capacity-gib", type=float, default=78.0)
    ap.add_argument("--unet-plan-latent", type=int, default=64,
                    help="also compile (not run) the SD-shaped UNet's programs at this latent size; 0: skip")
    ap.add_argument("--unet-plan-chunks", type=int, nargs="+", default=[8, 16, 32, 120])
    return ap.parse_args(argv)


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
