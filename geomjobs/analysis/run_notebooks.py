"""Run the analysis notebooks (``notebooks/*.py``, jupytext py:percent) and collect their figures.

    python -m geomjobs.analysis.run_notebooks [--full] [--out out/notebooks] [--kernel] [--dir notebooks]
                                              [--findings docs/findings.md] [NAME ...]

Each notebook runs in its own process with ``GEOMJOBS_NB_OUT=<out>/<name>`` (its datasets and
PNGs go there) and, with ``--full``, ``GEOMJOBS_NB_FULL=1`` (see :mod:`geomjobs.analysis.notebook`).
By default a notebook runs as a plain Python script; ``--kernel`` runs it cell by cell through
jupytext + nbclient on a real IPython kernel instead (what a reader opening it in Jupyter gets).
NAME selects notebooks by file stem or prefix (``01`` or ``01_toy_ddpm``); default: all of them.
Each notebook writes its measured verdicts to ``<out>/<name>/verdicts.json``
(:mod:`geomjobs.analysis.findings`); the runner prints them, and ``--findings FILE`` writes the
markdown table of every ``<out>/*/verdicts.json`` to FILE (``make notebooks``: docs/findings.md).
Exit status 1 when any notebook fails; a summary line per notebook (time, PNGs written, verdicts).
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

from geomjobs.analysis import findings
from geomjobs.analysis.notebook import FULL_ENV, OUT_ENV

NOTEBOOKS_DIR = Path(__file__).resolve().parents[2] / "notebooks"


def notebook_paths(names=(), folder: Path | str = NOTEBOOKS_DIR) -> list[Path]:
    """notebooks/*.py sorted by name; ``names``: only those whose stem equals or starts with one."""
    paths = sorted(Path(p) for p in glob.glob(os.path.join(str(folder), "*.py")))
    if names:
        chosen = [p for p in paths if any(p.stem == n or p.stem.startswith(n) for n in names)]
        unknown = [n for n in names if not any(p.stem == n or p.stem.startswith(n) for p in paths)]
        if unknown:
            raise SystemExit(f"run_notebooks: no notebook matches {unknown} in {folder} (have {[p.stem for p in paths]})")
        paths = chosen
    return paths


def notebook_environment(out_dir: str, full: bool) -> dict:
    env = dict(os.environ)
    env[OUT_ENV] = str(out_dir)
    env[FULL_ENV] = "1" if full else "0"
    env.setdefault("MPLBACKEND", "Agg")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_script(path: Path, out_dir: str, full: bool = False, timeout: float | None = None,
               launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python [launcher ...] <notebook>.py`` in a child process (cwd: the output folder); output
    captured. ``launcher``: a script (and its arguments) that runs the notebook given last, e.g.
    one that records the figures a test checks."""
    os.makedirs(out_dir, exist_ok=True)
    return subprocess.run([sys.executable, *launcher, str(path)], cwd=out_dir, env=notebook_environment(out_dir, full),
                          capture_output=True, text=True, timeout=timeout)


def inject_parameters(nb, parameters: dict) -> None:
    """Insert a code cell tagged ``injected-parameters`` right after the cell tagged ``parameters``
    (papermill's convention) assigning ``parameters`` (their repr), so they override the defaults."""
    import nbformat

    where = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if not where:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    src = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(src, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(where[0] + 1, cell)


def run_kernel(path: Path, out_dir: str, full: bool = False, timeout: int = 600, kernel_name: str = "python3",
               parameters: dict | None = None):
    """Execute the notebook through jupytext + nbclient on a real kernel (cwd: the output folder);
    ``parameters`` override the parameters cell's values (:func:`inject_parameters`). Returns the
    executed nbformat notebook (raises nbclient's CellExecutionError on a failing cell). The
    kernel gets the notebook environment through os.environ, restored afterwards."""
    import jupytext
    from nbclient import NotebookClient

    os.makedirs(out_dir, exist_ok=True)
    nb = jupytext.read(str(path))
    if parameters:
        inject_parameters(nb, parameters)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(notebook_environment(out_dir, full))
    try:
        client = NotebookClient(nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": out_dir}})
        client.execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return nb


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="notebook stems or prefixes (default: all)")
    ap.add_argument("--full", action="store_true", help="full size (GEOMJOBS_NB_FULL=1)")
    ap.add_argument("--out", default="out/notebooks", help="each notebook writes under OUT/<name>/")
    ap.add_argument("--kernel", action="store_true", help="run through jupytext + nbclient on a kernel")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per notebook (default: none)")
    ap.add_argument("--dir", default=str(NOTEBOOKS_DIR), help="the notebooks folder (default: the checkout's notebooks/)")
    ap.add_argument("--findings", default=None, metavar="FILE",
                    help="write the markdown table of every OUT/*/verdicts.json to FILE (make notebooks: docs/findings.md)")
    args = ap.parse_args(argv)

    failed = []
    for path in notebook_paths(args.names, args.dir):
        out_dir = os.path.abspath(os.path.join(args.out, path.stem))
        t0 = time.perf_counter()
        print(f"== {path.name} -> {out_dir}", flush=True)
        stale = os.path.join(out_dir, findings.FILE)
        if os.path.exists(stale):
            os.remove(stale)              # this run's verdicts, not an earlier one's (the data folders resume)
        if args.kernel:
            try:
                run_kernel(path, out_dir, args.full, timeout=int(args.timeout or 3600))
                ok, tail = True, ""
            except Exception as e:  # noqa: BLE001 - report and go on with the others
                ok, tail = False, f"{type(e).__name__}: {e}"
        else:
            try:
                proc = run_script(path, out_dir, args.full, args.timeout)
                ok, tail = proc.returncode == 0, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                ok, tail = False, f"timed out after {args.timeout} s"
            if ok:
                sys.stdout.write(proc.stdout)
        pngs = sorted(glob.glob(os.path.join(out_dir, "*.png")))
        verdicts = findings.collect(os.path.dirname(out_dir)).get(path.stem, {}).get("findings", {}) if ok else {}
        print(f"   {'ok' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s, {len(pngs)} PNGs, "
              f"{len(verdicts)} verdicts" + "".join(f"\n     {k}: {v['verdict']}" for k, v in verdicts.items()), flush=True)
        if not ok:
            failed.append(path.name)
            print("\n".join(tail.splitlines()[-40:]), file=sys.stderr)
    if args.findings:
        command = ("python -m geomjobs.analysis.run_notebooks" + (" --full" if args.full else "")
                   + f" --out {args.out} --findings {args.findings}")
        findings.write_findings(args.out, args.findings, command=command)
        print(f"findings table: {args.findings}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
