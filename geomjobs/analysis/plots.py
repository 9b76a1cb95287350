"""Figures for the notebooks (matplotlib, imported on first use): heatmaps of grid2d / plane3
slices and image grids; :func:`save_png`, the one PNG writer (local paths and gs://)."""
from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["image_grid", "image_mosaic", "save_figure", "save_png", "slice_grid", "slice_heatmap"]


def slice_grid(df, value: str):
    """(u values, v values, grid) of a ``grid2d`` / ``plane3`` dataset: ``grid[i, j]`` is
    ``value`` at the row with the i-th smallest u and the j-th smallest v (NaN where the dataset
    has no ok row there, e.g. an error)."""
    frame = df if isinstance(df, pd.DataFrame) else df.to_pandas() if hasattr(df, "to_pandas") else df.df()
    for c in ("u", "v", value):
        if c not in frame.columns:
            raise KeyError(f"column '{c}' is not in the table (slice heatmaps need the u, v columns of a grid2d / plane3 "
                           f"dataset); it has {list(frame.columns)}")
    sub = frame[["u", "v", value]].dropna(subset=["u", "v"])
    us, iu = np.unique(sub["u"].to_numpy(np.float64), return_inverse=True)
    vs, iv = np.unique(sub["v"].to_numpy(np.float64), return_inverse=True)
    grid = np.full((len(us), len(vs)), np.nan)
    grid[iu, iv] = sub[value].to_numpy(np.float64, na_value=np.nan)
    return us, vs, grid


def slice_heatmap(df, value: str, ax=None, *, cmap: str = "viridis", title: str | None = None, colorbar: bool = True,
                  anchors=None, mask=None, vmin=None, vmax=None, colorbar_label: str | None = None, **imshow_kw):
    """Heatmap of ``value`` over the (u, v) slice of a grid2d / plane3 dataset: u horizontal,
    v vertical, origin lower left; ``anchors``: (k, 2) plane coordinates to mark (plane3's anchors
    sit at (0, 0), (|a1 - a0|, 0), ...); ``mask``: a boolean (n_u, n_v) grid drawn as a white
    contour (e.g. an on-manifold set); ``colorbar_label``: the quantity and its unit (default:
    ``value``). Returns (ax, grid) with grid as in :func:`slice_grid`."""
    import matplotlib.pyplot as plt

    us, vs, grid = slice_grid(df, value)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4.2), constrained_layout=True)
    du = (us[1] - us[0]) / 2 if len(us) > 1 else 0.5
    dv = (vs[1] - vs[0]) / 2 if len(vs) > 1 else 0.5
    im = ax.imshow(grid.T, origin="lower", extent=[us[0] - du, us[-1] + du, vs[0] - dv, vs[-1] + dv], cmap=cmap,
                   aspect="auto", vmin=vmin, vmax=vmax, interpolation="nearest", **imshow_kw)
    if mask is not None:
        ax.contour(us, vs, np.asarray(mask, float).T, levels=[0.5], colors="white", linewidths=0.8)
    if anchors is not None:
        a = np.asarray(anchors, np.float64).reshape(-1, 2)
        ax.scatter(a[:, 0], a[:, 1], marker="x", c="red", s=40)
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    ax.set_title(title if title is not None else value)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.85, label=colorbar_label if colorbar_label is not None else value)
    return ax, grid


def image_mosaic(images, rows: int, cols: int | None = None, pad: int = 1, fill: float = np.nan) -> np.ndarray:
    """One array holding ``images`` (n, h, w) row-major in a rows x cols grid, ``pad`` cells of
    ``fill`` between them and around; cells past n are ``fill``. At most rows * cols images."""
    imgs = np.asarray(images, np.float64)
    if imgs.ndim != 3:
        raise ValueError(f"images must be (n, h, w), got shape {imgs.shape}")
    n, h, w = imgs.shape
    rows = int(rows)
    cols = int(cols) if cols is not None else max(1, -(-n // rows))
    if rows < 1 or n > rows * cols:
        raise ValueError(f"{n} images do not fit a {rows} x {cols} grid")
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad), fill)
    for k in range(n):
        r, c = divmod(k, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        out[y:y + h, x:x + w] = imgs[k]
    return out


def image_grid(images, rows: int, cols: int | None = None, ax=None, *, title: str | None = None, cmap: str = "gray_r",
               vmin: float = 0.0, vmax: float = 1.0, pad: int = 1):
    """Draw ``images`` (n, h, w), e.g. 8 x 8 digits in [0, 1], as a rows x cols grid on ``ax``
    (a new figure when None), axes off; returns (ax, mosaic) with mosaic from :func:`image_mosaic`."""
    import matplotlib.pyplot as plt

    mosaic = image_mosaic(images, rows, cols, pad)
    if ax is None:
        _, ax = plt.subplots(figsize=(0.5 * mosaic.shape[1] / 9 + 1, 0.5 * mosaic.shape[0] / 9 + 0.6))
    ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(title, fontsize=9)
    return ax, mosaic


def save_png(fig, uri: str, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG at ``uri`` (a local path, file:// or gs://, through
    :func:`geomjobs.sink.fs.filesystem`; a local folder is made if needed) and close the figure.
    The image is rendered in memory first, so a figure that fails to render writes nothing.
    Returns ``uri``."""
    import io
    import os

    import matplotlib.pyplot as plt

    from geomjobs.sink.fs import filesystem, is_local

    buf = io.BytesIO()
    buf.name = str(uri)          # what the figure is saved as, for anything that watches savefig
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    fs, path = filesystem(uri)
    if is_local(str(uri)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(buf.getvalue())
    return uri


def save_figure(fig, out_dir, name: str, dpi: int = 110) -> str:
    """Save ``fig`` as ``<out_dir>/<name>.png`` (:func:`save_png`: folder made if needed, local or
    gs://), close it, return the path."""
    import os

    return save_png(fig, os.path.join(str(out_dir), f"{name}.png"), dpi)
