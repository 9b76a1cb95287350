"""The per-process compute engine: one compiled, vmapped step over a fixed batch shape.

An engine is built once per process (a Ray worker, or the local driver) from a plan. Its step
(:func:`geomjobs.runner.step.make_step`) takes the model parameters and the job's fixed arrays
as arguments rather than closing over them, so XLA does not fold a large model's weights into
the program as constants. Every batch has exactly ``batch_size`` rows (the tail is padded), and
the step is compiled ahead of time, once: a batch of another shape is an error, never a
silent recompile.

``execution.dtype: bfloat16`` runs G and the local-scaling sweep (the k VJP rows or d JVP
columns) in bfloat16: the engine casts G's floating params and the latents to bf16 on the host,
keeps the job's fixed arrays (W, ...) in float32, and the spectrum code decomposes the rows in
float32 (geometry/spectrum.py ``svd_input``). Only ``local_scaling`` with ``mode: projection`` or
``exact`` has a bf16 path; a model whose code computes in float32 whatever its inputs (a cast to
float32 inside G) runs its matmuls in float32 on bf16-rounded weights, which ``describe`` says.
float32 and float64 jobs run exactly as before.
"""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa

from geomjobs import descriptors
from geomjobs.errors import SpecError
from geomjobs.runner import shards
from geomjobs.runner.precision import precision
from geomjobs.runner.step import make_step

if TYPE_CHECKING:
    from geomjobs.runner.plan import Plan

log = logging.getLogger(__name__)

BF16 = jnp.dtype(jnp.bfloat16)
BF16_MODES = ("projection", "exact")   # local_scaling modes with a bfloat16 sweep


class Engine:
    def __init__(self, plan: Plan):
        self.plan = plan
        self.batch_size = plan.spec["execution"]["batch_size"]
        self.dtype = jnp.dtype(plan.spec["execution"]["dtype"])
        self.compiles = 0             # programs this engine compiled (chunk: auto may try several)
        self.memory_bytes = None      # XLA's memory plan of the step, where the backend has one
        self.bf16_matmuls = None      # bfloat16 jobs: (G's matmuls and convolutions in bf16, all of them)
        # the fixed arrays (W, probes, abar) in the job's dtype; a bfloat16 job keeps them in float32
        arrays_dtype = jnp.dtype(jnp.float32) if self.dtype == BF16 else self.dtype
        with precision(self.dtype):
            self._params = plan.generator.params
            if self.dtype == BF16:
                check_bf16(plan)
                self._params = cast_floating(self._params, BF16)
            self._arrays = {k: jnp.asarray(v, arrays_dtype) for k, v in plan.arrays.items()}
            if self.dtype == BF16:
                self.bf16_matmuls = matmul_dtypes(plan, self._params, self._arrays)
                if not self.bf16_matmuls[0]:
                    log.warning("execution.dtype bfloat16: none of %s's %d matmuls/convolutions runs in bfloat16 "
                                "(its code computes in float32); they run in float32 on bf16-rounded weights and latents",
                                plan.generator.model_id, self.bf16_matmuls[1])
            self._split_across_devices()
            self._compile()

    def _compile(self) -> None:
        """Compile the step once. With several chunk candidates (``chunk: auto``), take the first
        whose XLA memory plan (temporaries + arguments + outputs, known from compiling, before
        any sample runs) fits :func:`memory_budget`; where the backend reports no memory plan,
        the first stands."""
        candidates = descriptors.chunk_candidates(list(self.plan.descriptors), jax.default_backend())
        budget = memory_budget() if len(candidates) > 1 else None
        need = None
        for chunk in candidates:
            jitted = make_step(self.plan, chunk)
            compiled = jitted.lower(*self._example_args()).compile()
            self.compiles += 1
            try:
                need = program_bytes(compiled)
            except Exception:  # noqa: BLE001 - no memory analysis on this backend
                need = None
            if need is None or budget is None or need <= budget:
                break
        if need is not None and budget is not None and need > budget:
            log.warning("chunk auto: even chunk %s needs %.2f GiB, over the %.2f GiB budget", chunk,
                        need / 2**30, budget / 2**30)
        self.memory_bytes = need
        if len(candidates) > 1:
            log.info("chunk auto -> %s (XLA memory plan %s, budget %s)", chunk,
                     "n/a" if need is None else f"{need / 2**30:.2f} GiB",
                     "n/a" if budget is None else f"{budget / 2**30:.2f} GiB")
        self.chunk, self._jitted, self._step = chunk, jitted, compiled

    def _example_args(self):
        z = np.zeros((self.batch_size, self.plan.generator.latent_dim), self.dtype)
        t = np.zeros((self.batch_size,), np.int32)
        return self._params, self._arrays, jax.device_put(z, self._z_sharding), jax.device_put(t, self._z_sharding)

    def _split_across_devices(self) -> None:
        """A process that sees several local devices (a TPU host, a multi-GPU worker) splits
        each batch across all of them: the batch axis is sharded over a 1-D mesh, parameters
        and the fixed arrays are replicated, and the batch is padded up to a multiple of the
        device count. One device: nothing changes."""
        devices = jax.local_devices()
        self.num_devices = len(devices)
        self._z_sharding = None
        if self.num_devices < 2:
            return
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(devices), ("batch",))
        self.batch_size = ceil_div(self.batch_size, self.num_devices) * self.num_devices
        self._z_sharding = NamedSharding(mesh, PartitionSpec("batch"))
        replicated = NamedSharding(mesh, PartitionSpec())
        self._params, self._arrays = jax.device_put((self._params, self._arrays), replicated)

    def describe(self) -> dict:
        """How this process runs the step (kept in each shard's commit marker): the descriptors'
        own keys (``mode``: the local-scaling mode, None without one), the cotangent chunk (None:
        all k rows in one pass), XLA's memory plan of the compiled step in bytes (None where the
        backend has none), the local device count, and ``display``: all of it in one line."""
        bound = descriptors.with_chunk(list(self.plan.descriptors), self.chunk)
        mem = "" if self.memory_bytes is None else f", XLA memory plan {self.memory_bytes / 2**30:.2f} GiB"
        if self.bf16_matmuls is not None:
            mem += (f", G and the sweep in bfloat16 ({self.bf16_matmuls[0]} of {self.bf16_matmuls[1]} matmuls/convolutions "
                    "in bf16), SVD in float32")
        return {"mode": None, **descriptors.marker(bound), "chunk": self.chunk, "xla_memory_bytes": self.memory_bytes,
                "devices": self.num_devices,
                "display": f"{descriptors.display(bound)}{mem}, {self.num_devices} device(s)"}

    def compute_shard(self, shard: int) -> pa.Table:
        """The records of ``shard`` (:func:`geomjobs.runner.shards.compute_shard`): what a
        driver asks of a job's engine (:class:`geomjobs.runner.job.ShardEngine`)."""
        return shards.compute_shard(self.plan, shard, self)

    def compiled_count(self) -> int:
        """How many programs this engine compiled: 1, or the chunks ``chunk: auto`` tried. The
        step is compiled ahead of time, so batches never add to it."""
        return self.compiles

    def _dispatch(self, zb: np.ndarray, tb: np.ndarray):
        """Start the step on one batch; returns the device outputs (JAX dispatches asynchronously,
        so the host is free to prepare the next batch while this one runs)."""
        with precision(self.dtype):
            # cast on the host: a device-side cast would be one more program to compile
            z = jax.device_put(np.asarray(zb, self.dtype), self._z_sharding)
            t = jax.device_put(np.asarray(tb, np.int32), self._z_sharding)
            return self._step(self._params, self._arrays, z, t)

    @staticmethod
    def _fetch(out) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in jax.device_get(out).items()}

    def _run(self, zb: np.ndarray, tb: np.ndarray) -> dict[str, np.ndarray]:
        return self._fetch(self._dispatch(zb, tb))

    def compute(self, z: np.ndarray, t: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], list[str | None]]:
        """Descriptors for latents z (m, *shape), any m; returns per-sample arrays and errors.
        ``t`` (m,) is each sample's own timestep where the plan evaluates a denoiser per record
        (trajectory latents); it is ignored otherwise.

        A failure is data: a non-finite latent or result becomes that sample's error, and a
        batch that raises is retried one sample at a time so only the culprit fails.
        """
        m = len(z)
        flat = np.asarray(z, np.float64).reshape(m, -1)
        errors: list[str | None] = [None] * m
        bad = ~np.all(np.isfinite(flat), axis=1)
        for i in np.flatnonzero(bad):
            errors[i] = "latent has non-finite values"
        flat = np.where(bad[:, None], 0.0, flat)
        steps = np.zeros(m, np.int32) if t is None else np.asarray(t, np.int32).reshape(m)
        bs = self.batch_size
        pieces = []

        def settle(start, real, zb, tb, out) -> None:
            try:
                if out is None:
                    raise RuntimeError("dispatch failed")
                res = self._fetch(out)
            except Exception:  # noqa: BLE001 - isolate the sample that raises
                res = self._one_by_one(zb[:real], tb[:real], errors, start)
            pieces.append({k: v[:real] for k, v in res.items()})

        # one batch in flight: batch k+1 is cast and dispatched before batch k's results are
        # fetched (the same program on the same inputs, so the same values)
        pending = None
        for start in range(0, m, bs):
            zb, tb = flat[start:start + bs], steps[start:start + bs]
            real = len(zb)
            if real < bs:  # pad the tail with copies of its first row: same shape, no recompile
                zb = np.concatenate([zb, np.repeat(zb[:1], bs - real, 0)])
                tb = np.concatenate([tb, np.repeat(tb[:1], bs - real, 0)])
            try:
                out = self._dispatch(zb, tb)
            except Exception:  # noqa: BLE001 - retried one sample at a time in settle
                out = None
            if pending is not None:
                settle(*pending)
            pending = start, real, zb, tb, out
        if pending is not None:
            settle(*pending)
        res = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]} if pieces else {}
        for desc, _ in self.plan.descriptors:
            for key in desc.finite:
                if key in res:
                    for i in np.flatnonzero(~np.isfinite(res[key])):
                        errors[i] = errors[i] or f"non-finite {key} ({res[key][i]})"
        return res, errors

    def _one_by_one(self, zb, tb, errors, offset):
        bs = self.batch_size
        rows = []
        for i in range(len(zb)):
            try:
                rows.append(self._run(np.repeat(zb[i:i + 1], bs, 0), np.repeat(tb[i:i + 1], bs, 0)))
            except Exception as e:  # noqa: BLE001
                errors[offset + i] = f"{type(e).__name__}: {e}".strip()[:2000]
                rows.append(None)
        template = next((r for r in rows if r is not None), None)
        if template is None:
            template = {k: np.zeros_like(v) for k, v in self._run_shapes().items()}
        return {k: np.stack([(r if r is not None else template)[k][0] for r in rows]) for k in template}

    def _run_shapes(self):
        z = jax.ShapeDtypeStruct((self.batch_size, self.plan.generator.latent_dim), self.dtype)
        t = jax.ShapeDtypeStruct((self.batch_size,), np.int32)
        with precision(self.dtype):
            shapes = jax.eval_shape(self._jitted, self._params, self._arrays, z, t)
        return {k: np.zeros(v.shape, v.dtype) for k, v in shapes.items()}


def check_bf16(plan: Plan) -> None:
    """A bfloat16 job computes only what has a bf16 path: local_scaling by ``projection`` or
    ``exact`` (local_rank from the same spectrum). delta's knots and the Krylov modes need more
    than bf16's 8 bits (delta's radius 1e-4 is below bf16's resolution of a latent)."""
    for desc, cfg in plan.descriptors:
        if desc.name != "local_scaling" or cfg.get("mode") not in BF16_MODES:
            what = desc.name if desc.name != "local_scaling" else f"local_scaling mode {cfg.get('mode')}"
            raise SpecError("execution.dtype", f"bfloat16 runs local_scaling's {' / '.join(BF16_MODES)} sweep in bf16; "
                                               f"{what} has no bfloat16 path (use float32)")


def cast_floating(tree, dtype):
    """Floating leaves of a pytree cast to ``dtype``; other leaves as they are."""
    def cast(a):
        a = jnp.asarray(a)
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
    return jax.tree_util.tree_map(cast, tree)


MATMULS = ("dot_general", "conv_general_dilated")


def matmul_dtypes(plan: Plan, params, arrays) -> tuple[int, int]:
    """(G's matmuls and convolutions whose operands are bfloat16, all of them) in the jaxpr of G
    at a bf16 latent with ``params``: does the model compute in the dtype it is given?"""
    apply, gen = plan.record_apply(), plan.generator
    z = jax.ShapeDtypeStruct(gen.latent_shape, BF16)
    jaxpr = jax.make_jaxpr(lambda p, z: apply(p, z, arrays, jnp.zeros((), jnp.int32)))(params, z).jaxpr
    found = [0, 0]

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name in MATMULS:
                found[1] += 1
                found[0] += all(v.aval.dtype == BF16 for v in eqn.invars)
            for v in eqn.params.values():
                for x in v if isinstance(v, (list, tuple)) else (v,):
                    inner = getattr(x, "jaxpr", x)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr)
    return found[0], found[1]


def memory_budget() -> int | None:
    """Bytes one engine's step may use: ``GEOMJOBS_MEMORY_BUDGET_GIB`` if set; else 90 % of what
    the first local device's allocator may hand out (GPU/TPU ``memory_stats()['bytes_limit']``);
    else, on a CPU, a quarter of the host's physical memory (Ray may run several workers per
    host); None if none of these is known."""
    env = os.environ.get("GEOMJOBS_MEMORY_BUDGET_GIB")
    if env:
        return int(float(env) * 2**30)
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - not every backend has memory stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(0.9 * stats["bytes_limit"])
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return None


def program_bytes(compiled) -> int | None:
    """Peak device bytes of a compiled program by XLA's memory analysis, or None."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
