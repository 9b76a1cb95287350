"""What a figure draws, read back from its matplotlib artists, so that a test checks a figure by
its data rather than by the size of its PNG (an empty figure with three titled axes saves at
~24 KB; an all-NaN heatmap with a colour bar at ~15 KB).

- :func:`panel_data`: per axes of a Figure (colour bars left out), the arrays its artists draw:
  images (``AxesImage.get_array()``, masked cells dropped), lines in data coordinates
  (``Line2D.get_ydata()``; axhline / axvline, drawn in axes coordinates, are reference marks and
  left out), scatter offsets and colours, filled areas and error bars (their vertices' y), bars
  (their heights).
- :func:`panel_problems`: what is wrong with each shown panel: no data at all, only constant or
  non-finite data, or an infinite value. A panel with its axis switched off and nothing drawn is
  a deliberate blank and passes.
- :func:`record_figures`: patch ``Figure.savefig`` (monkeypatch) to keep every figure saved, so a
  test can inspect the figure a function wrote to PNG.
- run as a script, ``python tests/figures.py DUMP_DIR SCRIPT [ARGS ...]`` runs SCRIPT as
  ``__main__`` and writes, for every figure it saves as NAME.png, ``DUMP_DIR/NAME.panels.json``
  with :func:`panel_summary` (for subprocess tests: the notebooks).
"""
from __future__ import annotations

import json
import os
import runpy
import sys

import numpy as np


def _is_colorbar(ax) -> bool:
    return ax.get_label() == "<colorbar>" or hasattr(ax, "_colorbar")


def _in_data_coords(artist, ax) -> bool:
    try:
        return artist.get_transform().contains_branch(ax.transData)
    except Exception:  # noqa: BLE001 - a transform that cannot say: count it
        return True


def panel_data(fig) -> list[tuple[object, list[np.ndarray]]]:
    """[(axes, [array drawn, ...]) for every axes of ``fig`` that is not a colour bar]."""
    from matplotlib.collections import PathCollection

    out = []
    for ax in fig.axes:
        if _is_colorbar(ax):
            continue
        arrays = []
        for im in ax.images:
            a = im.get_array()
            arrays.append(np.ma.compressed(a).astype(np.float64) if np.ma.isMaskedArray(a) else np.asarray(a, np.float64).ravel())
        for line in ax.lines:
            if _in_data_coords(line, ax):
                arrays.append(np.asarray(line.get_ydata(), np.float64).ravel())
        for c in ax.collections:
            if not _in_data_coords(c, ax) and not isinstance(c, PathCollection):
                continue
            if isinstance(c, PathCollection):
                off = np.asarray(c.get_offsets(), np.float64)
                if off.size:
                    arrays.append(off[:, 1])
                if c.get_array() is not None:
                    arrays.append(np.asarray(c.get_array(), np.float64).ravel())
            else:
                ys = [np.asarray(p.vertices, np.float64)[:, 1] for p in c.get_paths() if len(p.vertices)]
                if ys:
                    arrays.append(np.concatenate(ys))
        for container in ax.containers:
            if container.__class__.__name__ == "BarContainer":
                arrays.append(np.asarray([p.get_height() for p in container.patches], np.float64))
        out.append((ax, arrays))
    return out


def _informative(a: np.ndarray) -> bool:
    f = a[np.isfinite(a)]
    return f.size >= 2 and float(f.max()) > float(f.min())


def panel_summary(fig) -> list[dict]:
    """Per panel: its title, whether its axis is on, how many arrays it draws, how many of them
    hold two or more distinct finite values, and whether any holds an infinite value."""
    rows = []
    for ax, arrays in panel_data(fig):
        rows.append({"title": ax.get_title() or ax.get_xlabel() or ax.get_ylabel(), "axis_on": bool(ax.axison),
                     "arrays": len(arrays), "informative": sum(_informative(a) for a in arrays),
                     "infinite": any(bool(np.isinf(a).any()) for a in arrays),
                     "values": int(sum(a.size for a in arrays))})
    return rows


def panel_problems(summary) -> list[str]:
    """What is wrong with each shown panel of a :func:`panel_summary` (or a Figure): a panel
    shown (axis on) must draw at least one array with two or more distinct finite values, and no
    panel may draw an infinite value. Empty list: every panel is fine."""
    if not isinstance(summary, list):
        summary = panel_summary(summary)
    problems = []
    for i, p in enumerate(summary):
        name = f"panel {i} ({p['title']!r})"
        if p["infinite"]:
            problems.append(f"{name} draws an infinite value")
        if p["arrays"] == 0 and not p["axis_on"]:
            continue                                   # a deliberate blank
        if p["informative"] == 0:
            problems.append(f"{name} draws no finite, non-constant data ({p['arrays']} arrays, {p['values']} values)")
    if not summary:
        problems.append("the figure has no axes")
    elif not any(p["informative"] for p in summary):
        problems.append("no panel draws data")
    return problems


def assert_figure_draws_data(fig_or_summary, what: str = "figure") -> None:
    problems = panel_problems(fig_or_summary)
    assert not problems, f"{what}: " + "; ".join(problems)


def record_figures(monkeypatch) -> list[tuple[str, object]]:
    """Patch ``matplotlib.figure.Figure.savefig`` so that every figure saved is kept:
    returns the list that fills with (path, figure), in the order they are saved."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        # save_png renders into a BytesIO named after its destination
        path = os.fspath(fname) if isinstance(fname, (str, os.PathLike)) else getattr(fname, "name", repr(fname))
        saved.append((path, self))
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return saved


def figure_saved_as(saved, name: str):
    """The last figure of :func:`record_figures` saved under a path ending in ``name``."""
    hits = [fig for path, fig in saved if path.endswith(name)]
    assert hits, f"no figure saved as {name}; saved: {[p for p, _ in saved]}"
    return hits[-1]


def _dump_on_save(dump_dir: str) -> None:
    from matplotlib.figure import Figure

    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        out = original(self, fname, *args, **kwargs)
        # save_png renders into a BytesIO named after its destination
        path = os.fspath(fname) if isinstance(fname, (str, os.PathLike)) else getattr(fname, "name", None)
        if isinstance(path, str):
            stem = os.path.splitext(os.path.basename(path))[0]
            with open(os.path.join(dump_dir, f"{stem}.panels.json"), "w") as f:
                json.dump(panel_summary(self), f)
        return out

    Figure.savefig = savefig


def read_dumps(dump_dir) -> dict[str, list[dict]]:
    """{figure name: its panel summary} from the ``*.panels.json`` a run as a script wrote."""
    out = {}
    for name in sorted(os.listdir(dump_dir)):
        if name.endswith(".panels.json"):
            with open(os.path.join(dump_dir, name)) as f:
                out[name[: -len(".panels.json")]] = json.load(f)
    return out


if __name__ == "__main__":
    dump, script = sys.argv[1], sys.argv[2]
    os.makedirs(dump, exist_ok=True)
    _dump_on_save(dump)
    sys.argv = sys.argv[2:]
    sys.path[0] = os.path.dirname(os.path.abspath(script))     # as `python SCRIPT` has it, not tests/
    runpy.run_path(script, run_name="__main__")
