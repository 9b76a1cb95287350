"""`make bench`: throughput figures, measured side by side in one run, written to BENCHMARKS.md.

Every section is a module of this folder (``TABLE``) with ``parse(argv) -> args``, ``run(args) ->
markdown`` and ``SMOKE``, the arguments of a run at tiny sizes (seconds; tests/test_benchmarks.py
runs each so). ``--only NAME ...`` runs some sections and keeps the others' text from the
existing --out file; ``--smoke`` runs at the tiny sizes and prints (writes only to an --out
given). A section that raises is reported and keeps its earlier text; the others are still written,
and the exit status is 1. Each section can also run alone: ``python benchmarks/<module>.py [its flags]``.

Machines here are shared and noisy, so each comparison interleaves its variants (A, B, A, B,
...) and reports medians and the ratio; absolute times mean something only on a quiet GPU.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from common import machine  # noqa: E402

# name -> (title of its BENCHMARKS.md section, module). Titles are the keys of the text kept from an
# earlier run: a renamed title drops that section's text (hand-written notes included) on the next write.
TABLE = {
    "foundation": ("Descriptor engine (issue 2)", "bench_foundation"),
    "ray": ("Ray pipeline overhead (issue 3)", "bench_ray"),
    "estimators": ("psi estimators: error, rank correlation and cost (issue 4)", "estimators"),
    "sd": ("Stable-Diffusion-shaped VAE decoder (issue 4)", "bench_sd"),
    "dit": ("DiT-XL/2 at 256 x 256: memory plan (issue 21)", "bench_dit"),
    "sdxl": ("SDXL at 1024 x 1024: memory plan (issue 21)", "bench_sdxl"),
    "generation": ("Generation as a job: samplers, sampled and trajectory jobs (issue 9)", "bench_generation"),
    "reward": ("Reward model: training throughput and guided sampling (issue 10)", "bench_reward"),
    "reward_train": ("Reward model: training data path (issue 10)", "bench_reward_train"),
    "fisher": ("Fisher metric: Ising sampler and pipeline (issue 12)", "bench_fisher"),
    "fisher_slice": ("Fisher slice at 128 x 128 and the Ising L=8 pipeline: wall time by stage (issue 20)", "bench_fisher_slice"),
    "scale": ("Jobs at scale: a million latents, manifests of 10k-40k shards (issue 13)", "bench_scale"),
    "manifest": ("Manifest: resume and inspect at scale (issue 13)", "bench_manifest"),
}
ALL = list(TABLE)


def load(name: str):
    """The module of section ``name`` (ImportError when its optional dependencies are missing)."""
    return importlib.import_module(TABLE[name][1])


def section_args(mod, smoke: bool):
    """The section's arguments: its defaults, or its tiny sizes (``mod.SMOKE``)."""
    return mod.parse(list(mod.SMOKE) if smoke else [])


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


def main(argv=None) -> int:
    import jax

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the file to write (default BENCHMARKS.md; with --smoke: none, only printed)")
    ap.add_argument("--only", nargs="+", default=ALL, choices=ALL, metavar="NAME",
                    help=f"sections to run (default: all of {', '.join(ALL)}); the others keep their text from the --out file")
    ap.add_argument("--smoke", action="store_true", help="every section at its tiny sizes (seconds each): a check, not figures")
    args = ap.parse_args(argv)
    out = args.out if args.out or args.smoke else "BENCHMARKS.md"
    cmd = "make bench  # " + " ".join([os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv)))
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
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
    fresh, failed = {}, []
    for name in args.only:
        try:
            mod = load(name)
        except ImportError as e:
            print(f"skipping section {name}: {e}", file=sys.stderr)
            continue
        t = time.perf_counter()
        try:
            body = mod.run(section_args(mod, args.smoke))
        except Exception:  # noqa: BLE001 - the other sections still run and are written; the exit status says so
            traceback.print_exc()
            print(f"section {name} FAILED after {time.perf_counter() - t:.0f} s; its earlier text is kept", file=sys.stderr)
            failed.append(name)
            continue
        note = ", smoke sizes: not figures" if args.smoke else ""
        fresh[name] = "\n".join(["", body.strip("\n"), "", f"_(section `{name}`: {time.perf_counter() - t:.0f} s, "
                                                          f"written {when} at {rev}{note})_", ""])
        print(f"section {name} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    old = previous_sections(out) if out else {}   # read at the end: sections written meanwhile by another run are kept
    for name in ALL:
        title = TABLE[name][0]
        if name in fresh:
            lines += [f"## {title}", fresh[name]]
        elif title in old:   # kept from an earlier run: its own footer says when and at which commit
            lines += [f"## {title}", old[title]]
    known = {TABLE[name][0] for name in ALL}
    for title, body in old.items():   # sections other tools write (make bench-peer's) stay, in their order
        if title not in known:
            lines += [f"## {title}", body]
    text = "\n".join(lines)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)
    if failed:
        print(f"failed sections: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
