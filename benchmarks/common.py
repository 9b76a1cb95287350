"""What the benchmark sections share: the machine line, variants timed side by side in
interleaved rounds, XLA's cost and memory plan of a compiled program, and markdown tables.

Machines here are shared and noisy, so a comparison interleaves its variants (A, B, A, B, ...)
and reports medians; the ratio between variants measured together is the figure to read.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence


def machine() -> str:
    """The device, core count, CPU model, Python and jax versions, in one line."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = jax.devices()[0]
    return (f"{dev.platform.upper()} ({dev.device_kind}), {os.cpu_count()} cores, {cpu}; "
            f"Python {platform.python_version()}, jax {jax.__version__}")


def _wait(out):
    """Block until JAX arrays in ``out`` are computed (asynchronous dispatch); anything else as is."""
    import jax

    return jax.block_until_ready(out)


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, repeats: int = 1,
                warm: bool = True) -> dict[str, list[float]]:
    """Seconds of each call of each variant (a callable taking no arguments), measured in
    ``rounds`` rounds A, B, C, A, B, C, ... of ``repeats`` calls of each variant in turn, so load
    on a shared machine hits every variant alike. JAX results are waited for. ``warm``: call
    every variant once first (its compile), untimed."""
    if warm:
        for fn in variants.values():
            _wait(fn())
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            for _ in range(repeats):
                t = time.perf_counter()
                _wait(fn())
                times[k].append(time.perf_counter() - t)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v) for k, v in times.items()}


def side_by_side(variants: dict[str, Callable[[], object]], rounds: int, repeats: int = 1,
                 warm: bool = True) -> dict[str, float]:
    """Median seconds per call of each variant, measured by :func:`interleaved`."""
    return medians(interleaved(variants, rounds, repeats, warm))


def xla_cost(compiled) -> tuple[float, int | None]:
    """(FLOPs by XLA's cost analysis, NaN where the backend has none; bytes of its memory plan,
    temporaries + arguments + outputs as the engine counts them (``engine.program_bytes``), None
    where the backend has none) of a compiled program."""
    from geomjobs.runner.engine import program_bytes

    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float((ca or {}).get("flops", float("nan")))
    except Exception:  # noqa: BLE001 - not every backend reports it
        flops = float("nan")
    try:
        need = program_bytes(compiled)
    except Exception:  # noqa: BLE001 - not every backend reports it
        need = None
    return flops, need


def fmt_flops(x: float) -> str:
    """FLOPs with a unit prefix and a trailing space (``'1.23 G'``), to be followed by 'FLOP'."""
    for unit, s in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if abs(x) >= s:
            return f"{x / s:.2f} {unit}"
    return f"{x:.0f} "


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Markdown table lines: the header, the separator, one line per row (cells through str)."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
