"""Memory plan of psi + nu (projection, k = 120) and delta (P = 4) per sample at SDXL's 1024 x 1024
(latent 4 x 128 x 128, d = 65536): the SDXL VAE decoder (``kind: diffusers-vae-decoder``; the SD
VAE's architecture, block_out_channels (128, 256, 512, 512), with scaling_factor 0.13025) -> image
3 x 1024 x 1024 (n = 3145728), and the SDXL base UNet (``kind: diffusers-unet`` with the text_time
added conditioning: 2048-d sequence and 1280-d pooled embeddings, 6 micro-conditions; block_out
(320, 640, 1280), transformer layers (1, 2, 10), linear projections), x0 prediction at t = 400
with classifier-free guidance (two branches, SDXL's usual setting).

The programs are the job's own step (``runner.plan.resolve`` + ``runner.step.make_step``, through
benchmarks/bench_sd.py's helpers), compiled for this machine's backend and never run; XLA's memory
analysis gives temporaries + arguments + outputs (``engine.program_bytes``, what ``chunk: auto``
compares with the device's budget). The UNet's 2.6B parameters are ShapeDtypeStructs (nothing
allocated; its delta, whose planning traces the model once, is left out); the VAE decoder's 50M
are random (bench_sd.sd_vae). ``--config tiny``: the tests' tiny shapes (the smoke run).

    python benchmarks/bench_sdxl.py                     # CPU compile: VAE bf16 + f32, UNet bf16
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_sd import SD_VAE, TINY_VAE, compiled, delta, forward_flops, plan_for, psi_nu, sd_vae, vae_generator
from common import fmt_flops, gib, machine, table, xla_cost

from geomjobs import diffusion
from geomjobs.generators.diffusers import Conditioning, Numerics, Target, unet_from_module
from geomjobs.generators.diffusers import sdxl as sdxl_cond

SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}
SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, cross_attention_dim=2048,
                 addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
TINY_UNET = dict(SDXL_UNET, sample_size=4, block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(1, 2),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), cross_attention_dim=16, addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=12 + 6 * 8)
CONFIGS = {"sdxl": (SDXL_VAE, SDXL_UNET, 77), "tiny": (TINY_VAE, TINY_UNET, 5)}   # vae, unet, prompt tokens
SMOKE = ["--config", "tiny", "--latent", "2", "--dtypes", "float32", "--k", "4", "--chunks", "4",
         "--unet-latent", "2", "--unet-dtype", "float32", "--unet-chunks", "4"]


def sdxl_unet_generator(config: dict, tokens: int, latent: int, dtype: str, cfg_scale: float | None = 5.0, timestep: int = 400,
                        remat: str = "none", efficient_attention: bool = False):
    """The SDXL-shaped UNet as the ``diffusers-unet`` generator on ShapeDtypeStruct params in
    ``dtype``: x0 at ``timestep`` (SDXL's scaled_linear schedule), an all-zero prompt (tokens x
    cross_attention_dim, pooled row zero, SDXL's zeroed negative), time_ids of a 8 x latent square."""
    from diffusers import FlaxUNet2DConditionModel

    unet = FlaxUNet2DConditionModel(**{**config, "sample_size": latent}, use_memory_efficient_attention=efficient_attention)
    shapes = jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(dtype)), shapes)
    rows = 1 if cfg_scale is None else 2
    added = sdxl_cond.Added(np.zeros((rows, sdxl_cond.pooled_width(unet.config)), np.float32),
                            sdxl_cond.time_ids({}, unet.config, (4, latent, latent), negative=rows == 2))
    cond = Conditioning(np.zeros((rows, tokens, config["cross_attention_dim"]), np.float32), cfg_scale, added=added)
    abar = diffusion.alphas_cumprod(diffusion.betas("scaled_linear", 1000, 0.00085, 0.012))[timestep]
    gen = unet_from_module(unet, params, cond, Target((4, latent, latent), timestep, float(abar), prediction="x0"),
                           Numerics(compute=jnp.dtype(dtype), remat=remat), model_id="sdxl-unet-random")
    return gen, sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))


@contextlib.contextmanager
def shapes_only_w():
    """W (k x n) as a read-only broadcast of one zero while planning: a compile needs its shape, not
    its values, and drawing it (a QR of n x k float64: at n = 3 x 1024 x 1024, k = 120, ~3 GiB per
    copy and ~10 GiB at peak) would not fit beside the compiler on a small host."""
    from geomjobs.geometry.modes import projection

    real = projection.orthonormal_rows
    projection.orthonormal_rows = lambda rows, cols, seed, stream: np.broadcast_to(np.float32(0), (rows, cols))
    try:
        yield
    finally:
        projection.orthonormal_rows = real


def abstract_args(plan):
    """The step's (params, arrays, z, t) with arrays, z and t as ShapeDtypeStructs (as the engine
    passes them: arrays in float32, one sample)."""
    sds = jax.ShapeDtypeStruct
    arrays = {k: sds(np.shape(v), jnp.float32) for k, v in plan.arrays.items()}
    return plan.generator.params, arrays, sds((1, plan.generator.latent_dim), jnp.float32), sds((1,), jnp.int32)


def plans(gens: dict, progs: list, args, with_delta: bool) -> tuple[list, dict]:
    """Rows [dtype, program, plan, fits, compile s] of the psi+nu programs ``progs`` ((dtype, remat,
    chunk) on ``gens[(dtype, remat)]``) and delta per dtype, one sample each, compiled never run;
    {dtype: (forward, VJP row) FLOPs}."""
    k, rows, flops_of = args.k, [], {}
    todo = list(progs) + ([(dt, "none", None) for dt in dict.fromkeys(p[0] for p in progs)] if with_delta else [])
    for dt, remat, chunk in todo:
        gen = gens[(dt, remat)]
        with shapes_only_w():
            plan = plan_for(gen, delta(args.directions, args.radius) if chunk is None else psi_nu(k, chunk), 1)
        c, secs = compiled(plan, chunk, abstract_args(plan))
        flops, need = xla_cost(c)
        name = f"delta, P = {args.directions}" if chunk is None else f"psi+nu, chunk {min(chunk, k)}"
        name += f", remat {remat}" if remat != "none" else ""
        if chunk is not None and chunk >= k and remat == "none":
            fwd = forward_flops(gen, jax.ShapeDtypeStruct((1, gen.latent_dim), jnp.float32))
            flops_of[dt] = (fwd, (flops - fwd) / k)
        rows.append([dt, name, gib(need), "n/a" if need is None else ("yes" if need / 2**30 <= args.capacity_gib else "no"),
                     f"{secs:.0f}"])
        print(f"[bench_sdxl] {dt} {name}: {gib(need)}, compiled in {secs:.0f} s", file=sys.stderr)
        del c
    return rows, flops_of


def run(args) -> str:
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    vae_cfg, unet_cfg, tokens = CONFIGS[args.config]
    lat, k, cap = args.latent, args.k, args.capacity_gib
    up = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    dev = jax.devices()[0]
    out = [f"XLA's memory plan (temporaries + arguments + outputs, `engine.program_bytes`) of the job's own step "
           f"(`runner.plan.resolve` + `runner.step.make_step`), k = {k}, P = {args.directions}, one sample per program, "
           f"compiled for {dev.platform.upper()} ({machine()}) and never run; `fits`: <= {cap:g} GiB (one H100 80 GB).", ""]
    t0 = time.perf_counter()
    vae, params32 = sd_vae(vae_cfg, lat)
    gens = {(dt, r): vae_generator(vae, params32, lat, dt, r) for dt in args.dtypes for r in ("none", *args.remat)}
    progs = [(dt, r, c) for dt in args.dtypes for r, c in [("none", c) for c in args.chunks] +
             [(r, c) for r in args.remat for c in args.remat_chunks]]
    rows, flops_of = plans(gens, progs, args, with_delta=not args.no_delta)
    name = "SDXL VAE decoder" if args.config == "sdxl" else "tiny VAE decoder"
    out += [f"**{name}** (`diffusers-vae-decoder`, block_out_channels {tuple(vae_cfg['block_out_channels'])}, scaling_factor "
            f"{vae_cfg.get('scaling_factor', 0.18215)}, random weights): latent 4 x {lat} x {lat} -> image 3 x {up * lat} x "
            f"{up * lat} (d = {4 * lat * lat}, n = {3 * (up * lat) ** 2}).", "",
            *table(["dtype", "program", "XLA memory plan", "fits", "compile s"], rows), ""]
    out += [f"- {dt}: one forward pass = {fmt_flops(f)}FLOP, one VJP row = {fmt_flops(v)}FLOP: psi + nu with k = {k} is about "
            f"{fmt_flops(f + k * v)}FLOP per sample (XLA's count)." for dt, (f, v) in flops_of.items()]
    del gens, params32
    if args.unet_latent:
        ulat, dt = args.unet_latent, args.unet_dtype
        r = args.unet_remat
        gen, n_params = sdxl_unet_generator(unet_cfg, tokens, ulat, dt, None if args.unet_cfg == 1 else args.unet_cfg, remat=r,
                                            efficient_attention=args.unet_efficient_attention)
        rows, flops_of = plans({(dt, r): gen}, [(dt, r, c) for c in args.unet_chunks], args, with_delta=False)
        branches = "1 branch" if args.unet_cfg == 1 else f"classifier-free guidance {args.unet_cfg:g} (2 branches)"
        if args.unet_efficient_attention:
            branches += ", diffusers' chunked (memory-efficient) attention"
        out += ["", f"**SDXL-shaped UNet** (`diffusers-unet`, {n_params / 1e9:.2f}B parameters as ShapeDtypeStructs in {dt}, "
                f"text_time added conditioning, cross-attention {unet_cfg['cross_attention_dim']}, transformer layers "
                f"{tuple(unet_cfg['transformer_layers_per_block'])}): x0 prediction at t = 400, {branches}, a {tokens}-token "
                f"prompt; latent 4 x {ulat} x {ulat} (d = n = {4 * ulat * ulat}).", "",
                *table(["dtype", "program", "XLA memory plan", "fits", "compile s"], rows), ""]
        out += [f"- UNet: one forward pass = {fmt_flops(f)}FLOP, one VJP row = {fmt_flops(v)}FLOP (XLA's count)."
                for f, v in flops_of.values()]
        out.append("- The UNet's delta is not planned here: its planning traces the model on concrete parameters "
                   "(5 GiB of zeros in bfloat16).")
    out += [f"- Command: `{' '.join(['python benchmarks/bench_sdxl.py', *args.argv])}` ({time.perf_counter() - t0:.0f} s here).",
            "- Compiled for the CPU: XLA:CPU's buffer assignment (read the bfloat16 rows as an upper bound: XLA:CPU may "
            "compute bfloat16 convolutions in float32). A GPU compile fuses differently; `chunk: auto` starts at 32 on an "
            "accelerator and halves until the plan fits the device budget."]
    return "\n".join(out)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sdxl")
    ap.add_argument("--latent", type=int, default=128, help="VAE latent h = w (128 -> 1024 x 1024)")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="VAE decoder dtypes")
    ap.add_argument("--k", type=int, default=120)
    ap.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16, 32, 120])
    ap.add_argument("--remat", nargs="*", default=[], choices=["dots", "full"], help="VAE remat policies (at --remat-chunks)")
    ap.add_argument("--remat-chunks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--no-delta", action="store_true", help="leave the VAE's delta out")
    ap.add_argument("--directions", type=int, default=4)
    ap.add_argument("--radius", type=float, default=1e-4)
    ap.add_argument("--unet-latent", type=int, default=128, help="UNet latent h = w; 0: skip the UNet")
    ap.add_argument("--unet-dtype", default="bfloat16")
    ap.add_argument("--unet-chunks", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--unet-remat", default="none", choices=["none", "dots", "full"])
    ap.add_argument("--unet-efficient-attention", action="store_true",
                    help="diffusers' use_memory_efficient_attention (a Flax-only setting no job spec sets yet)")
    ap.add_argument("--unet-cfg", type=float, default=5.0, help="classifier-free guidance scale (1: one branch)")
    ap.add_argument("--capacity-gib", type=float, default=78.0)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


if __name__ == "__main__":
    sys.stdout.write(run(parse()) + "\n")
