"""`make bench-peer`: geomjobs' psi against the same estimator written in PyTorch (issue 22).

A user who does not pick geomjobs writes the paper's estimator in PyTorch: ``torch.func.vjp`` of
the generator, ``vmap`` over the k rows of W, ``torch.linalg.svdvals`` (benchmarks/peer_torch.py,
run in its own environment, ``.venv-peer``). This harness runs in geomjobs' venv and, for each
case, writes the weights, W and the latents to a folder, builds geomjobs' job from a spec
(``runner.plan.plan_job``: the job's own generator, descriptor and engine) and starts the torch
worker as a subprocess it drives over a pipe. The two never compute at the same time: rounds
alternate (geomjobs, chosen side; geomjobs, side forced to vjp; torch; geomjobs ...), each in its
own process, and the figures are medians over rounds.

Cases (``--cases``): ``mlp`` (64-256-256-3072 ReLU, kind mlp), ``conv`` (4x8x8 -> 3x32x32: three
3x3 convs, 64 channels, SiLU, nearest 2x upsampling; kind python), ``sd`` (an SD-1.x-shaped VAE
decoder, diffusers' AutoencoderKL config with random weights, latent 4x4x4 -> 3x32x32; geomjobs
reads the PyTorch folder the peer reads, written by ``write_pytorch_folder``), ``vae-digits``
and ``dit-digits`` (the zoo models; the DiT is ported to torch by hand in peer_torch.py).

For each case: samples/s side by side and the ratio; FLOP per sample by XLA's count of each
compiled step; the share of the CPU's nominal fp32 peak (:func:`cpu_peak`); psi agreement in
float32 and float64 (the same function and estimator on both sides); with ``--bf16``, the job
at ``execution.dtype: bfloat16`` (the VJP rows in bf16, the SVD in float32) against float32:
speed and the psi error table over ``--error-count`` latents, beside torch in bf16.

    python benchmarks/bench_peer.py --peer-python .venv-peer/bin/python --out BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import fmt_flops, machine, table, xla_cost  # noqa: E402
from flax import linen as nn  # noqa: E402

import geomjobs  # noqa: E402,F401 - sets XLA_FLAGS (geomjobs/_xla.py) before the backend starts

TITLE = "PyTorch peer: psi side by side (issue 22)"
CASES = ("mlp", "conv", "vae-digits", "dit-digits", "sd")   # the longest last
BATCH = {"mlp": 16, "conv": 16, "sd": 2, "vae-digits": 16, "dit-digits": 16}
# the torch worker's variant per case: auto (time both, keep the faster) except sd, where the batched
# variant holds every sample's 120 cotangents at once (~3.5 GB per sample at 32 x 32 on a shared 23 GB host)
PEER_VARIANT = {"sd": "per-sample"}
ERROR_COUNT = {"mlp": 256, "conv": 256, "sd": 16, "vae-digits": 512, "dit-digits": 512}
TARGET = 1.1
# cases whose geomjobs model computes in float32 whatever the job's dtype (generators/dit.py casts
# x_t to float32): their float64 job is a float32 computation, checked at the float32 tolerance
F32_ONLY = {"dit-digits": "the zoo DiT casts x_t to float32, so geomjobs' float64 job computes in float32"}
# --smoke: the MLP alone, one round, no repeats, the bf16 job on two batches, no profile
SMOKE = ["--cases", "mlp", "--rounds", "1", "--min-seconds", "0", "--bf16", "--error-count", "32", "--no-profile"]


# ----------------------------------------------------------------------------------------------
# the machine's nominal peak
# ----------------------------------------------------------------------------------------------

def cpu_peak(fma_units: int = 1, cpuinfo: str | None = None, lscpu: str | None = None, cores: int | None = None) -> dict:
    """Nominal fp32 (and bf16) peak FLOP/s of this CPU from /proc/cpuinfo and lscpu:
    cores x clock x SIMD fp32 lanes (16 with avx512f, 8 with avx2, else 4) x 2 (an FMA is two
    FLOPs, with the fma flag) x ``fma_units`` (vector FMA issues per cycle at that width: 1
    assumed; AMD Zen 4 runs a 512-bit FMA over its two 256-bit pipes, which is 1; many Intel
    Xeons have two 512-bit units: twice this peak). Clock: lscpu's "CPU max MHz", else
    /proc/cpuinfo's "cpu MHz" (a VM often shows only the nominal one; a core boosting above it
    can pass 100 %). bf16: twice fp32 with avx512_bf16 (VDPBF16PS: two bf16 products per fp32
    lane), None without. ``cpuinfo``, ``lscpu``, ``cores``: the texts and count to read (default:
    this machine's)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    if lscpu is None:
        try:
            lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
        except OSError:
            lscpu = ""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    flags = re.search(r"^flags\s*:(.*)$", cpuinfo, re.M)
    flags = set(flags.group(1).split()) if flags else set()
    mhz, src = None, None
    m = re.search(r"CPU max MHz:\s*([\d.]+)", lscpu)
    if m:
        mhz, src = float(m.group(1)), "lscpu CPU max MHz"
    else:
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
        if m:
            mhz, src = float(m.group(1)), "/proc/cpuinfo cpu MHz"
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    fma = 2 if "fma" in flags else 1
    f32 = cores * (mhz or 0) * 1e6 * lanes * fma * fma_units
    bf16 = 2 * f32 if "avx512_bf16" in flags else None
    simd = "avx512f" if lanes == 16 else "avx2" if lanes == 8 else "sse"
    text = (f"{cores} cores x {mhz or 0:.0f} MHz ({src}) x {lanes} fp32 lanes ({simd}) x {fma} (fma) x {fma_units} FMA "
            f"issue/cycle = {f32 / 1e9:.0f} GFLOP/s fp32" + (f", {bf16 / 1e9:.0f} GFLOP/s bf16 (avx512_bf16)" if bf16 else ""))
    return {"f32": f32 if mhz else None, "bf16": bf16 if mhz else None, "text": text,
            "bf16_flags": sorted(flags & {"avx512_bf16", "amx_bf16"})}


def loadavg() -> float:
    return os.getloadavg()[0]


def uptime() -> str:
    """`uptime`'s line (the time and the 1, 5 and 15 minute load averages), stripped."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ----------------------------------------------------------------------------------------------
# the models, written to a case folder (weights, W, z, case.json) and as a geomjobs spec
# ----------------------------------------------------------------------------------------------

class ConvDecoder(nn.Module):
    """(C, h, w) -> (3, 4h, 4w): 3x3 conv -> SiLU -> nearest 2x, twice, then a 3x3 conv to 3 channels."""
    channels: int = 64

    @nn.compact
    def __call__(self, z):
        h = jnp.transpose(z, (1, 2, 0))[None]                              # NHWC
        for i in range(2):
            h = nn.silu(nn.Conv(self.channels, (3, 3), name=f"conv_{i}")(h))
            b, y, x, c = h.shape
            h = jax.image.resize(h, (b, 2 * y, 2 * x, c), "nearest")
        h = nn.Conv(3, (3, 3), name="conv_2")(h)
        return jnp.transpose(h[0], (2, 0, 1))                             # (3, H, W)


def conv_decoder(weights: str, channels: int = 64):
    """``kind: python`` entry point of the conv case: (apply, params) from an .npz of conv_i/kernel, conv_i/bias."""
    flat = dict(np.load(weights))
    params = {"params": {}}
    for k, v in flat.items():
        layer, leaf = k.split("/")
        params["params"].setdefault(layer, {})[leaf] = jnp.asarray(v)
    module = ConvDecoder(channels)
    return (lambda p, z: module.apply(p, z)), params


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v, np.float32)
    return out


def write_case(name: str, folder: str) -> tuple[dict, dict]:
    """(the geomjobs model section, case.json's fields) of case ``name``; weights written to ``folder``."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(folder, "weights.npz")
    if name == "mlp":
        sizes = [64, 256, 256, 3072]
        arrays = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            arrays[f"W{i}"] = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
            arrays[f"b{i}"] = (0.1 * rng.standard_normal(b)).astype(np.float32)
        np.savez(weights, **arrays)
        return {"kind": "mlp", "weights": weights, "activation": "relu"}, {"latent_shape": [64], "out_shape": [3072]}
    if name == "conv":
        shapes = {"conv_0": (3, 3, 4, 64), "conv_1": (3, 3, 64, 64), "conv_2": (3, 3, 64, 3)}
        arrays = {}
        for layer, s in shapes.items():
            arrays[f"{layer}/kernel"] = (rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[:3]))).astype(np.float32)
            arrays[f"{layer}/bias"] = (0.1 * rng.standard_normal(s[3])).astype(np.float32)
        np.savez(weights, **arrays)
        return ({"kind": "python", "entrypoint": "bench_peer:conv_decoder", "kwargs": {"weights": weights},
                 "latent_shape": [4, 8, 8], "model_id": "conv-decoder"}, {"latent_shape": [4, 8, 8], "out_shape": [3, 32, 32]})
    if name == "sd":
        import warnings

        import diffusers
        from bench_sd import SD_VAE

        from geomjobs.generators.diffusers import module_random_params, write_pytorch_folder

        diffusers.utils.logging.set_verbosity_error()
        warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
        vae = diffusers.FlaxAutoencoderKL(**{**SD_VAE, "sample_size": 32})
        write_pytorch_folder(module_random_params(vae, seed=0, spread=0.1), vae.config, os.path.join(folder, "vae"), "float32")
        return ({"kind": "diffusers-vae-decoder", "path": os.path.join(folder, "vae"), "model_id": "sd-vae-random"},
                {"latent_shape": [4, 4, 4], "out_shape": [3, 32, 32]})
    if name == "vae-digits":
        from geomjobs.generators.vae import decoder_params, load_vae

        module, params, _ = load_vae("vae-digits")
        np.savez(weights, **_flat(decoder_params(params)["params"]))
        return {"kind": "zoo", "name": "vae-digits"}, {"latent_shape": [module.latent_dim], "out_shape": list(module.image_shape)}
    if name == "dit-digits":
        from geomjobs import diffusion
        from geomjobs.generators.dit import ARCH_KEYS, load_dit

        module, params, meta = load_dit("dit-digits")
        np.savez(weights, **_flat(params["params"]))
        shape = [module.image_size, module.image_size]
        return ({"kind": "zoo", "name": "dit-digits", "timestep": 0, "prediction": "x0"},
                {"latent_shape": shape, "out_shape": shape, "timestep": 0, "abar": float(diffusion.abar(meta["schedule"])[0]),
                 "architecture": {k: getattr(module, k) for k in ARCH_KEYS}})
    raise ValueError(f"unknown case {name!r}")


# ----------------------------------------------------------------------------------------------
# geomjobs' side: the job's own plan and engine
# ----------------------------------------------------------------------------------------------

def job_spec(model: dict, latent_shape, count: int, batch: int, dtype: str = "float32", seed: int = 0) -> dict:
    return {"model": model, "latents": {"kind": "gaussian", "count": count, "shape": list(latent_shape), "seed": seed},
            "descriptors": {"local_scaling": {"mode": "projection"}},   # k = min(120, n)
            "execution": {"batch_size": batch, "dtype": dtype}}


def with_side(plan, side: str):
    """The plan with local_scaling's side forced (the job binds it from XLA's counts)."""
    from geomjobs.descriptors.base import Bound

    return dataclasses.replace(plan, descriptors=tuple(
        Bound(d, {**cfg, "side": side}) if d.name == "local_scaling" else Bound(d, cfg) for d, cfg in plan.descriptors))


def side_of(plan) -> str:
    return next(cfg.get("side", "vjp") for d, cfg in plan.descriptors if d.name == "local_scaling")


class Geomjobs:
    """One compiled job step (``runner.engine.Engine``) on one batch of latents."""

    def __init__(self, plan, z):
        from geomjobs.runner.engine import Engine

        t = time.perf_counter()
        self.plan, self.z = plan, z
        self.engine = Engine(plan)
        self.compile_s = time.perf_counter() - t
        self.flops = xla_cost(self.engine._step)[0] / self.engine.batch_size
        self.side = side_of(plan)

    def psi(self) -> np.ndarray:
        res, errors = self.engine.compute(self.z)
        bad = [e for e in errors if e]
        if bad:
            raise RuntimeError(f"geomjobs step failed: {bad[0]}")
        return np.asarray(res["local_scaling"], np.float64)


# ----------------------------------------------------------------------------------------------
# the torch worker
# ----------------------------------------------------------------------------------------------

class Peer:
    """peer_torch.py in the peer venv, one JSON request and answer per line."""

    def __init__(self, python: str, env: dict | None = None, worker: str = os.path.join(HERE, "peer_torch.py")):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen([python, worker], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, bufsize=1)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker exited (status {self.proc.poll()}); its stderr is above")
        ans = json.loads(line)
        if "error" in ans:
            raise RuntimeError(f"torch worker: {ans['error']}\n{ans.get('trace', '')}")
        return ans

    def close(self):
        try:
            self.ask(op="quit")
        except Exception:  # noqa: BLE001 - it exits on quit without answering
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------

def rounds(variants: dict, n: int, repeats: dict) -> dict[str, list[float]]:
    """Seconds per call of each variant (a callable returning seconds of ``repeats`` calls, each
    timed alone), in ``n`` rounds A, B, C, A, B, C, ...: the median call of each round, and the
    load average each round saw."""
    out = {k: [] for k in variants}
    out["_load"] = []
    for _ in range(n):
        for k, fn in variants.items():
            secs = fn(repeats[k])
            out[k].append(statistics.median(secs))
        out["_load"].append(loadavg())
    return out


def timed(fn):
    def run(r):
        secs = []
        for _ in range(r):
            t = time.perf_counter()
            fn()
            secs.append(time.perf_counter() - t)
        return secs
    return run


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure_case(name: str, args, peer: Peer, root: str, peak: dict, log) -> dict:
    from geomjobs.runner.plan import plan_job
    from geomjobs.runner.precision import precision

    folder = os.path.join(root, name)
    model, info = write_case(name, folder)
    batch = args.batch or BATCH[name]
    spec = job_spec(model, info["latent_shape"], batch, batch)
    plan = plan_job(spec)
    z = np.asarray(plan.latents.latents(np.arange(batch)), np.float32).reshape(batch, -1)
    w = np.asarray(plan.arrays["W"], np.float32)
    np.save(os.path.join(folder, "W.npy"), w)
    np.save(os.path.join(folder, "W64.npy"), np.asarray(plan.arrays["W"], np.float64))   # the float64 check's W
    np.save(os.path.join(folder, "z.npy"), z)
    with open(os.path.join(folder, "case.json"), "w") as f:
        json.dump({"kind": name, **info}, f)
    chosen = Geomjobs(plan, z)
    progs = {"chosen": chosen}
    if chosen.side != "vjp":
        progs["vjp"] = Geomjobs(with_side(plan, "vjp"), z)
    log(f"{name}: d = {plan.generator.latent_dim}, n = {plan.generator.output_dim}, k = {w.shape[0]}, side {chosen.side}, "
        f"compiled in {chosen.compile_s:.1f} s")
    t = time.perf_counter()
    variant = args.peer_variant or PEER_VARIANT.get(name, "auto")
    tload = peer.ask(op="load", case=folder, dtype="float32", variant=variant)
    log(f"{name}: torch loaded and warmed in {time.perf_counter() - t:.1f} s, variant {tload['variant']} {tload['choice']}")
    # warm-up calls give the repeats: each timed measurement at least --min-seconds
    psi = {k: g.psi() for k, g in progs.items()}
    warm = {k: timed(g.psi)(1)[0] for k, g in progs.items()}
    warm["torch"] = statistics.median(peer.ask(op="time", case=folder, repeats=1)["seconds"])
    repeats = {k: max(1, math.ceil(args.min_seconds / max(s, 1e-6))) for k, s in warm.items()}
    variants = {k: timed(g.psi) for k, g in progs.items()}
    variants["torch"] = lambda r: peer.ask(op="time", case=folder, repeats=r)["seconds"]
    times = rounds(variants, args.rounds, repeats)
    res = {"name": name, "batch": batch, "d": plan.generator.latent_dim, "n": plan.generator.output_dim, "k": int(w.shape[0]),
           "side": chosen.side, "variant": tload["variant"], "choice": tload["choice"], "times": times, "repeats": repeats,
           "flops": {k: g.flops for k, g in progs.items()}, "torch": tload["torch"], "threads": tload["threads"]}
    res["sec"] = {k: statistics.median(v) for k, v in times.items() if k != "_load"}
    res["load"] = (min(times["_load"]), statistics.median(times["_load"]), max(times["_load"]))
    # psi: float32 both sides, and float64 both sides (the same function and estimator)
    psi_t = np.asarray(tload["psi"])
    res["psi32"] = {"geomjobs": psi["chosen"], "geomjobs_vjp": psi.get("vjp", psi["chosen"]), "torch": psi_t}
    if args.f64:
        # a diffusers model computes in its own model.dtype (float32 by default): float64 on both keys
        model64 = {**model, "dtype": "float64"} if model["kind"].startswith("diffusers") else model
        spec64 = job_spec(model64, info["latent_shape"], batch, batch, "float64")
        with precision("float64"):
            plan64 = plan_job(spec64)
        psi64 = Geomjobs(plan64, z).psi()
        psi64_t = np.asarray(peer.ask(op="load", case=folder, dtype="float64", variant="per-sample")["psi"])
        res["psi64"] = {"geomjobs": psi64, "torch": psi64_t}
    if args.profile:
        res["profile"] = profile_case(name, plan, z, peer, folder, chosen)
    if args.bf16:
        res["bf16"] = measure_bf16(name, args, peer, folder, model, info, chosen, plan, log)
    return res


def measure_bf16(name, args, peer, folder, model, info, chosen, plan32, log) -> dict:
    """``execution.dtype: bfloat16`` against float32: speed side by side (with torch in bf16
    beside it), and the psi error over ``error_count`` latents."""
    from geomjobs.runner.plan import plan_job

    batch = chosen.engine.batch_size
    if model["kind"].startswith("diffusers"):   # a diffusers model computes in its model.dtype
        model = {**model, "dtype": "bfloat16"}
    plan16 = plan_job(job_spec(model, info["latent_shape"], batch, batch, "bfloat16"))
    g16 = Geomjobs(plan16, chosen.z)
    t16 = peer.ask(op="load", case=folder, dtype="bfloat16", variant=args.peer_variant or PEER_VARIANT.get(name, "auto"))
    warm = {"f32": timed(chosen.psi)(1)[0], "bf16": timed(g16.psi)(1)[0],
            "torch_f32": statistics.median(peer.ask(op="time", case=folder, repeats=1)["seconds"]),
            "torch_bf16": statistics.median(peer.ask(op="time", case=folder, dtype="bfloat16", repeats=1)["seconds"])}
    repeats = {k: max(1, math.ceil(args.min_seconds / max(s, 1e-6))) for k, s in warm.items()}
    times = rounds({"f32": timed(chosen.psi), "bf16": timed(g16.psi),
                    "torch_f32": lambda r: peer.ask(op="time", case=folder, repeats=r)["seconds"],
                    "torch_bf16": lambda r: peer.ask(op="time", case=folder, dtype="bfloat16", repeats=r)["seconds"]},
                   args.rounds, repeats)
    out = {"sec": {k: statistics.median(v) for k, v in times.items() if k != "_load"}, "flops16": g16.flops,
           "side16": g16.side, "load": statistics.median(times["_load"]), "torch_psi16": np.asarray(t16["psi"])}
    # the error table: the same latents through the float32 and the bfloat16 job
    count = args.error_count or ERROR_COUNT[name]
    count = max(batch, count // batch * batch)
    spec = job_spec(model, info["latent_shape"], count, batch, "float32", seed=1)
    p32 = plan_job(spec)
    zs = np.asarray(p32.latents.latents(np.arange(count)), np.float32).reshape(count, -1)
    e32 = Geomjobs(p32, zs)
    e16 = Geomjobs(plan_job({**spec, "execution": {**spec["execution"], "dtype": "bfloat16"}}), zs)
    a, b = e32.psi(), e16.psi()
    r = rel(b, a)
    out["errors"] = {"count": count, "median_rel": float(np.median(r)), "max_rel": float(np.max(r)),
                     "median_abs": float(np.median(np.abs(b - a))), "max_abs": float(np.max(np.abs(b - a))),
                     "spearman": spearman(a, b), "psi_range": (float(np.min(a)), float(np.max(a)))}
    log(f"{name}: bf16 {out['sec']} errors {out['errors']}")
    return out


def profile_case(name, plan, z, peer, folder, chosen) -> dict:
    """Where the time goes on each side: geomjobs' step split into its phases (G's forward pass
    on the batch; the k x d rows W A; the SVD of the B rows), each compiled and timed alone with
    XLA's FLOP count; and torch.profiler's top operators of one call."""
    from geomjobs.geometry.spectrum import SIDES

    gen = plan.generator
    g = gen.flat_fn()
    w = jnp.asarray(plan.arrays["W"], jnp.float32)
    zj = jnp.asarray(z)
    side = chosen.side
    # W an argument, as in the job's step: a W closed over is a constant XLA folds through G's last layer
    fwd = jax.jit(jax.vmap(g)).lower(zj).compile()
    rows = jax.jit(jax.vmap(lambda x, w: SIDES[side](g, x, w), in_axes=(0, None))).lower(zj, w).compile()
    m = rows(zj, w)
    svd = jax.jit(jax.vmap(lambda a: jnp.linalg.svd(a, compute_uv=False))).lower(m).compile()
    phases = {}
    for label, fn, args in (("forward G", fwd, (zj,)), (f"W A ({side} side)", rows, (zj, w)), ("SVD", svd, (m,))):
        fn(*args).block_until_ready()
        secs = []
        for _ in range(3):
            t = time.perf_counter()
            fn(*args).block_until_ready()
            secs.append(time.perf_counter() - t)
        phases[label] = {"s": statistics.median(secs), "flops": xla_cost(fn)[0]}
    torch_ops = peer.ask(op="profile", case=folder, top=8)["ops"]
    return {"phases": phases, "torch": torch_ops, "step_s": statistics.median(timed(chosen.psi)(3)),
            "xla_ops": xla_ops(chosen)}


def xla_ops(prog, top: int = 6) -> list[dict]:
    """Per-operation time of one call of the job's compiled step, from jax.profiler's trace of
    XLA:CPU (each thunk's events summed over threads), the top ``top``, each with the JAX
    operation it comes from (the HLO metadata's op_name)."""
    import collections
    import glob

    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="bench-peer-trace-")
    try:
        jax.profiler.start_trace(d)
        prog.psi()
        jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return []
        acc = collections.Counter()
        for plane in ProfileData.from_file(files[0]).planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue
                for ev in line.events:
                    if not ev.name.startswith(("ThunkExecutor", "end:")):
                        acc[ev.name] += ev.duration_ns
    finally:
        shutil.rmtree(d, ignore_errors=True)
    text = prog.engine._step.as_text()
    out = []
    for name, ns in acc.most_common(top):
        m = re.search(r"%" + re.escape(name) + r" = (\S+) .*?op_name=\"([^\"]*)\"", text)
        shape, where = (m.group(1), "/".join(m.group(2).split("/")[-2:])) if m else ("", "")
        out.append({"op": name, "s": ns / 1e9, "shape": shape, "from": where})
    return out


# ----------------------------------------------------------------------------------------------
# the section
# ----------------------------------------------------------------------------------------------

LABEL = {"mlp": "MLP 64-256-256-3072 ReLU", "conv": "conv decoder 4x8x8 -> 3x32x32 (3 convs, 64 ch, nearest up)",
         "sd": "SD-1.x-shaped VAE decoder, 4x4x4 -> 3x32x32", "vae-digits": "vae-digits (zoo)", "dit-digits": "dit-digits (zoo)"}


def psi_tolerance(res) -> tuple[float, float]:
    """(float32 tolerance on |psi_torch - psi_geomjobs|, float64 tolerance) for a case: see the notes
    the section prints (``TOL32``, ``TOL64`` per singular value)."""
    r = min(res["k"], res["d"])
    return TOL32 * r, TOL64 * r


# |d psi| <= sum_i |d s_i| / s_i over the r = min(k, d) singular values: an error of TOL per
# singular value, relative, on average
TOL32 = 2e-4
TOL64 = 1e-10


def check(res) -> list[str]:
    tol32, tol64 = psi_tolerance(res)
    p = res["psi32"]
    bad = []
    for k in ("geomjobs", "geomjobs_vjp"):
        dev = float(np.max(np.abs(p[k] - p["torch"])))
        if not dev <= tol32:
            bad.append(f"{res['name']}: float32 psi of {k} and torch differ by {dev:.3g} > {tol32:.3g}")
    if "psi64" in res:
        dev = float(np.max(np.abs(res["psi64"]["geomjobs"] - res["psi64"]["torch"])))
        tol64 = tol32 if res["name"] in F32_ONLY else tol64
        if not dev <= tol64:
            bad.append(f"{res['name']}: float64 psi of geomjobs and torch differ by {dev:.3g} > {tol64:.3g}")
    return bad


def render(results: list[dict], args, peak: dict, started: float, load: tuple) -> str:
    f32 = peak["f32"]
    share = lambda flops, s: f"{100 * flops / s / f32:.0f} %" if f32 and s else "n/a"  # noqa: E731
    rows = []
    for r in results:
        b, sec, fl = r["batch"], r["sec"], r["flops"]
        sv = sec.get("vjp", sec["chosen"])
        flv = fl.get("vjp", fl["chosen"])
        rows.append([LABEL[r["name"]], f"{r['d']} / {r['n']} / {r['k']}", b, r["side"],
                     f"{b / sec['chosen']:.3g}", f"{b / sv:.3g}", f"{b / sec['torch']:.3g} ({r['variant']})",
                     f"**{sec['torch'] / sec['chosen']:.2f}x**", f"{sec['torch'] / sv:.2f}x",
                     fmt_flops(fl["chosen"]) + "FLOP", fmt_flops(flv) + "FLOP",
                     share(fl["chosen"] * b, sec["chosen"]), share(flv * b, sv), share(flv * b, sec["torch"]),
                     f"{r['load'][1]:.1f}"])
    first = results[0]
    flags = f"; XLA_FLAGS {os.environ['XLA_FLAGS']!r} on geomjobs' side" if os.environ.get("XLA_FLAGS") else ""
    out = [
        f"geomjobs' job step (`runner.plan.plan_job` + `runner.engine.Engine`: psi by `mode: projection`, k = min(120, n)) "
        f"against the same estimator in PyTorch (benchmarks/peer_torch.py: `torch.func.vjp` of G, `torch.func.vmap` over "
        f"the k rows of W, `torch.linalg.svdvals`; torch {first['torch']}, {first['threads']} threads) on the same weights, "
        f"the same W and the same latents. Each side in its own process, never at the same time: {args.rounds} interleaved "
        "rounds (geomjobs with the side the job chose; geomjobs with the side forced to vjp; torch), medians. "
        f"{machine()}{flags}; load average during the run {load[0]:.1f}-{load[1]:.1f} (1 min, sampled per round; "
        "2 cores shared with other sessions). Written by `make bench-peer` "
        f"(`python benchmarks/bench_peer.py {' '.join(args.argv)}`), {time.perf_counter() - started:.0f} s. "
        f"`uptime` before: `{args.uptime[0]}`; after: `{args.uptime[-1]}`.", "",
        *table(["case", "d / n / k", "batch", "side chosen", "geomjobs samples/s", "geomjobs, vjp forced",
                "torch samples/s (variant)", "ratio (chosen / torch)", "ratio (vjp / torch)", "FLOP/sample (chosen)",
                "FLOP/sample (vjp)", "peak share geomjobs", "geomjobs vjp", "torch", "load avg"], rows), "",
        f"- Nominal peak: {peak['text']}. Share of peak = FLOP/sample by XLA's cost analysis of the compiled step x "
        "samples/s / peak; torch's share uses the FLOP count of geomjobs' vjp-side program (the algorithm torch runs).",
        "- ratio = torch seconds per batch / geomjobs seconds per batch (> 1: geomjobs ahead). `vjp forced` is the job "
        "with `side` set to vjp (k VJPs, what torch does); the chosen side is the job's own (`cheaper_side`: d JVPs and "
        "one product with W where XLA counts that cheaper), so `ratio (chosen)` minus `ratio (vjp)` is what item 2 bought.",
        "- torch variant: `batched` (one `vjp` of G on the whole batch, the k rows vmapped) or `per-sample`; the worker "
        "times both twice after warming up and keeps the faster (sd: per-sample only, for memory), so the peer is the better of the two.",
    ]
    # psi agreement
    prow = []
    for r in results:
        tol32, tol64 = psi_tolerance(r)
        p = r["psi32"]
        d32 = max(float(np.max(np.abs(p[k] - p["torch"]))) for k in ("geomjobs", "geomjobs_vjp"))
        cells = [LABEL[r["name"]], f"{np.min(p['torch']):.6g} .. {np.max(p['torch']):.6g}", f"{d32:.2g}", f"{tol32:.2g}"]
        if "psi64" in r:
            q = r["psi64"]
            cells += [f"{float(np.max(np.abs(q['geomjobs'] - q['torch']))):.2g}",
                      f"{tol32:.2g} (*)" if r["name"] in F32_ONLY else f"{tol64:.2g}",
                      f"{float(np.max(np.abs(p['geomjobs'] - q['geomjobs']))):.2g}",
                      f"{float(np.max(np.abs(p['torch'] - q['torch']))):.2g}"]
        else:
            cells += ["", "", "", ""]
        prow.append(cells)
    out += ["", "psi agreement (max over the batch of |psi_geomjobs - psi_torch|; both sides of geomjobs checked):", "",
            *table(["case", "psi (torch, float32)", "float32 |diff|", "tolerance", "float64 |diff|", "tolerance",
                    "geomjobs f32 - f64", "torch f32 - f64"], prow), "",
            f"- Tolerance: |d psi| <= sum_i |d s_i| / s_i over the r = min(k, d) singular values, so a tolerance of "
            f"r x {TOL32:g} in float32 allows an average relative error of {TOL32:g} per singular value (~{TOL32 / 2**-24:.0f} "
            "float32 roundings: a deep network's rows carry one rounding per layer and per summed term, and the small "
            f"singular values amplify them); float64: r x {TOL64:g}. The float64 row is the check that both sides compute "
            "the same function and estimator (the float32 columns show what rounding alone gives: each side against "
            "its own float64 run)."]
    out += [f"- (*) {r['name']}: {F32_ONLY[r['name']]}; checked at the float32 tolerance." for r in results if r["name"] in F32_ONLY]
    behind = [r for r in results if r["sec"]["torch"] / r["sec"]["chosen"] < TARGET]
    if behind:
        out += ["", f"Behind the {TARGET}x target: " + ", ".join(LABEL[r["name"]] for r in behind) + "."]
    for r in results:
        if "profile" not in r:
            continue
        pf = r["profile"]
        ph = "; ".join(f"{k} {v['s'] * 1e3:.0f} ms ({fmt_flops(v['flops'])}FLOP, "
                       f"{v['flops'] / v['s'] / 1e9:.0f} GFLOP/s)" for k, v in pf["phases"].items())
        ops = "; ".join(f"{o['op']} {o['self_s'] * 1e3:.0f} ms" for o in pf["torch"][:6])
        xops = "; ".join(f"{o['op']} {o['s'] * 1e3:.0f} ms ({o['from']}, {o['shape']})" for o in pf.get("xla_ops", []))
        out += [f"- Profile, {LABEL[r['name']]} (batch {r['batch']}): geomjobs step {pf['step_s'] * 1e3:.0f} ms; its phases "
                f"compiled alone: {ph}. XLA's operations in one step (jax.profiler): {xops}. torch.profiler, one call, "
                f"top self CPU time: {ops}."]
    if any("bf16" in r for r in results):
        out += bf16_section(results, peak)
    return "\n".join(out)


def bf16_section(results, peak) -> list[str]:
    rows, erows = [], []
    for r in results:
        if "bf16" not in r:
            continue
        x, b = r["bf16"], r["batch"]
        s = x["sec"]
        rows.append([LABEL[r["name"]], f"{b / s['f32']:.3g}", f"{b / s['bf16']:.3g}", f"{s['f32'] / s['bf16']:.2f}x",
                     f"{b / s['torch_f32']:.3g}", f"{b / s['torch_bf16']:.3g}", f"{s['torch_f32'] / s['torch_bf16']:.2f}x",
                     f"{s['torch_bf16'] / s['bf16']:.2f}x", f"{x['load']:.1f}"])
        e = x["errors"]
        erows.append([LABEL[r["name"]], e["count"], f"{e['psi_range'][0]:.4g} .. {e['psi_range'][1]:.4g}",
                      f"{e['median_rel']:.2g}", f"{e['max_rel']:.2g}", f"{e['median_abs']:.2g}", f"{e['max_abs']:.2g}",
                      f"{e['spearman']:.4f}"])
    return ["", "### execution.dtype: bfloat16 (item 3)", "",
            f"The job at `execution.dtype: bfloat16` (params and activations of G in bf16, so the forward pass and the "
            f"VJP/JVP sweep run in bf16; latents, W and the SVD in float32) against the float32 job, with torch in bf16 "
            f"beside it (model and latents cast to bf16, rows back to float32 for `svdvals`). CPU flags: "
            f"{', '.join(peak['bf16_flags']) or 'no avx512_bf16 / amx_bf16'}.", "",
            *table(["case", "geomjobs f32 samples/s", "geomjobs bf16", "speed-up", "torch f32", "torch bf16", "speed-up",
                    "ratio bf16 (torch / geomjobs s)", "load avg"], rows), "",
            "psi of the bfloat16 job against the float32 job on the same latents (relative error |psi16 - psi32| / |psi32|, "
            "Spearman rank correlation of the two):", "",
            *table(["case", "latents", "psi range (f32)", "median rel. error", "max rel. error", "median |diff|",
                    "max |diff|", "Spearman"], erows)]


def write_section(path: str, body: str, title: str = TITLE) -> None:
    """Replace (or append) this section of ``path``, leaving every other section as it is."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        text = "# Benchmarks\n"
    head = f"## {title}"
    new = f"{head}\n\n{body.strip()}\n"
    start = text.find(head + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + new
    else:
        nxt = text.find("\n## ", start + len(head))
        text = text[:start] + new + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    with open(path, "w") as f:
        f.write(text)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", default=os.environ.get("PEER_PYTHON", ".venv-peer/bin/python"),
                    help="the peer environment's python (torch, diffusers, safetensors, numpy)")
    ap.add_argument("--peer-worker", default=os.path.join(HERE, "peer_torch.py"),
                    help="the worker script the peer python runs (tests use a NumPy stand-in, tests/peer_numpy.py)")
    ap.add_argument("--smoke", action="store_true", help="a check in seconds, not figures: " + " ".join(SMOKE)
                    + " (later arguments still apply; nothing is written without --out)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help=f"batch of every case (default per case: {BATCH})")
    ap.add_argument("--min-seconds", type=float, default=0.5, help="each timed measurement repeats calls up to this long")
    ap.add_argument("--peer-env", nargs="*", default=["OMP_WAIT_POLICY=passive"], metavar="KEY=VALUE",
                    help="environment of the torch worker (default: OpenMP threads sleep when idle, see the notes)")
    ap.add_argument("--peer-variant", choices=["auto", "batched", "per-sample"], default=None,
                    help=f"the torch worker's way (default auto, per case {PEER_VARIANT})")
    ap.add_argument("--no-f64", dest="f64", action="store_false", help="skip the float64 agreement check")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-phase profile")
    ap.add_argument("--bf16", action="store_true", help="also the execution.dtype: bfloat16 job, its speed and error table")
    ap.add_argument("--error-count", type=int, default=None, help=f"latents of the bf16 error table (default {ERROR_COUNT})")
    ap.add_argument("--fma-units", type=int, default=1, help="vector FMA issues per cycle per core for the nominal peak")
    ap.add_argument("--xla-flags", default="", help="XLA_FLAGS for geomjobs' side (e.g. "
                    "--xla_cpu_experimental_ynn_fusion_type=-reduce); the section says which were set")
    ap.add_argument("--title", default=TITLE, help="the BENCHMARKS.md section to write (replaced, others kept)")
    ap.add_argument("--out", default=None, help="write the section into this markdown file (BENCHMARKS.md)")
    ap.add_argument("--json", default=None, help="also dump the raw figures here")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    if args.smoke:
        args = ap.parse_args(SMOKE + argv)
    args.argv = argv
    return args


def dump_json(path: str, results: list[dict]) -> None:
    with open(path, "w") as f:
        json.dump(results, f, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o), indent=1)


def main(argv=None) -> int:
    args = parse(argv)
    if args.xla_flags:   # before the backend starts (the first jax.devices() below)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    log = lambda msg: print(f"[bench_peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if jax.devices()[0].platform != "cpu":
        log("note: geomjobs runs on " + jax.devices()[0].platform + ", torch on the CPU")
    started = time.perf_counter()
    args.uptime = [uptime()]
    log("uptime before: " + args.uptime[0])
    peak = cpu_peak(args.fma_units)
    log(peak["text"])
    root = tempfile.mkdtemp(prefix="bench-peer-")
    peer = Peer(args.peer_python, dict(kv.split("=", 1) for kv in args.peer_env), args.peer_worker)
    results, loads, failed = [], [loadavg()], []
    try:
        for name in args.cases:
            try:
                res = measure_case(name, args, peer, root, peak, log)
            except Exception as e:  # noqa: BLE001 - the other cases still run; the section and the exit status say so
                import traceback

                traceback.print_exc()
                failed.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if peer.proc.poll() is not None:   # the worker died (out of memory?): a fresh one for the next case
                    peer = Peer(args.peer_python, dict(kv.split("=", 1) for kv in args.peer_env), args.peer_worker)
                continue
            loads += res["times"]["_load"]
            log(f"{name}: s/batch {res['sec']}, ratio {res['sec']['torch'] / res['sec']['chosen']:.2f}x, load {res['load']}")
            results.append(res)
            if args.json:   # after every case, so a run stopped later keeps what it measured
                dump_json(args.json, results)
    finally:
        peer.close()
        shutil.rmtree(root, ignore_errors=True)
    args.uptime.append(uptime())
    log("uptime after: " + args.uptime[1])
    if not results:
        log("no case ran: " + "; ".join(failed))
        return 1
    body = render(results, args, peak, started, (min(loads), max(loads)))
    if failed:
        body += "\n\nCases that failed (not in the tables): " + "; ".join(failed) + "."
    bad = [m for r in results for m in check(r)]
    for m in bad:
        log("PSI MISMATCH " + m)
    if bad:
        body += "\n\n**psi disagrees beyond the tolerance** (the run exits 1):\n\n" + "\n".join(f"- {m}" for m in bad)
    print(body)
    if args.out:
        write_section(args.out, body, args.title)
    return 1 if bad or failed else 0


if __name__ == "__main__":
    sys.exit(main())
