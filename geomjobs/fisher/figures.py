"""The figures of a fisher run: ``fisher.png`` (every family) and ``slice.png`` (diffusion-slice),
written through :func:`geomjobs.analysis.plots.save_png` (local or gs://). Each is built by a
function returning the matplotlib figure (:func:`fisher_plot`, :func:`slice_plot`) so that what it
draws can be read back from its artists (:func:`drawn`): every colour bar is labelled with its
quantity and units, every line and marker style has a legend entry."""
from __future__ import annotations

import numpy as np

from geomjobs.analysis.plots import save_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _units(names) -> tuple[str, str]:
    """Units of F and of the metric's trace for parameters ``names``: F = log Z (or a log-likelihood
    potential) is in nats; g_ij = E[d_i log p d_j log p] is in 1 / (theta_i theta_j)."""
    return "nats", f"1/{names[0]}^2, 1/{names[1]}^2"


def fisher_plot(spec: dict, family, thetas, F, g, exact, geo):
    """F and the trace of g over the grid, estimate beside the exact reference where one exists
    (the estimate's F shifted by the affine term that best matches the exact F; both trace panels on
    one colour scale), geodesics on the trace panels (the fitted metric's: white; the exact metric's:
    red dashes). Returns the figure."""
    from geomjobs.fisher.potential import remove_affine

    plt = _pyplot()
    R1, R2 = spec["grid"]["resolution"]
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    ext = [lo[0], hi[0], lo[1], hi[1]]
    names = family.theta_names
    f_unit, g_unit = _units(names)
    tr = np.trace(g, axis1=1, axis2=2)
    tr_label = f"tr g = g_11 + g_22, Fisher information [{g_unit}]"
    panels = []   # (title, values, colour-bar label, is a trace panel)
    if exact is not None:
        Fa = remove_affine(F, exact["F"], thetas, spec["potential"]["coords"])
        panels += [("F (fitted, affine-aligned)", Fa, f"F, log-partition per sample [{f_unit}]", False),
                   ("F exact", exact["F"], f"exact F [{f_unit}]", False),
                   ("tr g (fitted)", tr, tr_label, True),
                   ("tr g exact", np.trace(exact["g"], axis1=1, axis2=2), f"exact {tr_label}", True)]
    else:
        panels += [("F (fitted)", F, f"F, log-partition per sample [{f_unit}]", False), ("tr g (fitted)", tr, tr_label, True),
                   ("det g (fitted)", np.linalg.det(g), f"det g [1/({names[0]} {names[1]})^2]", False)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.9))
    tr_max = np.percentile(np.concatenate([p[1] for p in panels if p[3]]), 99)
    for ax, (title, v, label, is_trace) in zip(axes, panels):
        kw = {"vmin": 0, "vmax": tr_max} if is_trace else {}
        im = ax.imshow(np.asarray(v).reshape(R1, R2).T, origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
        fig.colorbar(im, ax=ax, shrink=0.8, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        if is_trace and geo:
            for k, gd in enumerate(geo):
                ax.plot(*np.asarray(gd["path"]).T, "w-", lw=1.5, label="geodesic of the fitted metric" if k == 0 else "_nolegend_")
                if gd.get("exact_path") is not None:
                    ax.plot(*np.asarray(gd["exact_path"]).T, "r--", lw=1.2,
                            label="geodesic of the exact metric" if k == 0 else "_nolegend_")
            ax.legend(loc="upper left", fontsize=7, facecolor="0.55", framealpha=0.9)
    fig.suptitle(f"Fisher metric: {family.kind} ({spec['posterior']['kind']} posterior)", fontsize=11)
    fig.tight_layout()
    return fig


def fisher_figure(uri: str, spec: dict, family, thetas, F, g, exact, geo) -> None:
    """``fisher.png``: :func:`fisher_plot` written to ``uri``."""
    save_png(fisher_plot(spec, family, thetas, F, g, exact, geo), uri)


def slice_plot(spec, thetas, tr, psi, cls, ridge, family):
    """log10 tr g and psi side by side; class boundaries of the eta = 0 samples (black), the metric's
    ridge points (red) and the anchors (white stars) on both, with a legend. Returns the figure."""
    import matplotlib
    from matplotlib.collections import LineCollection

    plt = _pyplot()
    R1, R2 = spec["grid"]["resolution"]
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    ext = [lo[0], hi[0], lo[1], hi[1]]
    u, v = np.linspace(lo[0], hi[0], R1), np.linspace(lo[1], hi[1], R2)
    du, dv = (u[1] - u[0]) / 2, (v[1] - v[0]) / 2
    c = cls.reshape(R1, R2)
    segs = []
    for i in range(R1 - 1):
        for j in range(R2):
            if c[i, j] != c[i + 1, j]:
                x = u[i] + du
                segs.append([(x, v[j] - dv), (x, v[j] + dv)])
    for i in range(R1):
        for j in range(R2 - 1):
            if c[i, j] != c[i, j + 1]:
                y = v[j] + dv
                segs.append([(u[i] - du, y), (u[i] + du, y)])
    anchors_uv = (family.anchors - family.plane.origin) @ family.plane.basis.T
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    ltr = np.where(tr > 0, np.log10(np.where(tr > 0, tr, 1.0)), np.nan)   # tr g <= 0 (a non-convex fit): grey
    panels = [("log10 tr g (Fisher metric; grey: tr g <= 0)", ltr, "log10 tr g [tr g in 1/u^2, 1/v^2]"),
              ("psi (vae-digits decoder at the eta=0 z_0)", psi, "psi = sum_i log s_i of the decoder Jacobian [nats]")]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    for ax, (title, val, label) in zip(axes, panels):
        val = np.asarray(val, float).reshape(R1, R2)
        if np.isfinite(val).any():
            box = [ext[0] - du, ext[1] + du, ext[2] - dv, ext[3] + dv]
            fin = val[np.isfinite(val)]
            lo_c, hi_c = np.percentile(fin, [2, 98])
            im = ax.imshow(np.ma.masked_invalid(val.T), origin="lower", extent=box, aspect="auto", cmap=cmap, vmin=lo_c, vmax=hi_c)
            fig.colorbar(im, ax=ax, shrink=0.8, label=label)
        else:
            ax.text(0.5, 0.5, "psi not computed (family.psi: false)", transform=ax.transAxes, ha="center")
        if segs:
            ax.add_collection(LineCollection(segs, colors="k", linewidths=1.2, label="class boundary of the eta=0 samples"))
        rp = thetas[ridge]
        ax.plot(rp[:, 0], rp[:, 1], "r.", ms=4, label="ridge of tr g (local max along u or v)")
        ax.plot(anchors_uv[:, 0], anchors_uv[:, 1], "w*", ms=9, mec="k", label="anchor noises of the slice")
        ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("u")
        ax.set_ylabel("v")
    fig.suptitle(f"{family.model} slice: class boundaries of the eta=0 samples (black), metric ridges (red)", fontsize=10)
    fig.tight_layout()
    return fig


def slice_figure(uri, spec, thetas, tr, psi, cls, ridge, family) -> None:
    """``slice.png``: :func:`slice_plot` written to ``uri``."""
    save_png(slice_plot(spec, thetas, tr, psi, cls, ridge, family), uri)


def drawn(fig) -> list[dict]:
    """What a figure draws, read back from its artists, per axes with data (colour-bar axes are
    folded into the image they belong to): {"title", "images": [(masked array, colour-bar label)],
    "lines": [(label, style, x, y)], "collections": [(label, segments)], "legend": [(label, style)]};
    a style is (colour, line style, marker) as matplotlib resolves them."""
    from matplotlib.colors import to_hex

    def style(a):
        return (to_hex(a.get_color()), str(a.get_linestyle()), str(a.get_marker()))

    cbar_axes = {id(im.colorbar.ax) for ax in fig.axes for im in ax.images if im.colorbar is not None}
    out = []
    for ax in fig.axes:
        if id(ax) in cbar_axes:
            continue
        leg = ax.get_legend()
        entries = [] if leg is None else [(t.get_text(), style(h)) for h, t in zip(leg.legend_handles, leg.get_texts())]
        out.append({"title": ax.get_title(),
                    "images": [(np.ma.asarray(im.get_array(), float), None if im.colorbar is None else im.colorbar.ax.get_ylabel())
                               for im in ax.images],
                    "lines": [(ln.get_label(), style(ln), np.asarray(ln.get_xdata(), float), np.asarray(ln.get_ydata(), float))
                              for ln in ax.lines],
                    "collections": [(c.get_label(), [np.asarray(s, float) for s in c.get_segments()])
                                    for c in ax.collections if hasattr(c, "get_segments")],
                    "legend": entries})
    return out


def readability_problems(fig) -> list[str]:
    """What keeps a person from reading ``fig`` without the code, read from its artists (empty when
    none): an image without a colour bar, or whose colour-bar label names no units ("[...]"); an
    image whose shown (unmasked) values are not all finite, or are constant; a line whose points are
    not finite, or a drawn line (not markers alone) whose points are all equal; a line or marker
    style, or a line collection, with no legend entry."""
    probs = []
    for ax in drawn(fig):
        t = ax["title"] or "untitled axes"
        for arr, label in ax["images"]:
            if not label:
                probs.append(f"{t}: image without a labelled colour bar")
            elif "[" not in label or "]" not in label:
                probs.append(f"{t}: colour-bar label {label!r} names no units [...]")
            shown = arr.compressed()
            if shown.size == 0 or not np.isfinite(shown).all():
                probs.append(f"{t}: image values not finite")
            elif np.ptp(shown) == 0:
                probs.append(f"{t}: image constant ({shown[0]})")
        styles = {s for _, s in ax["legend"]}
        labels = {lab for lab, _ in ax["legend"]}
        for label, st, x, y in ax["lines"]:
            if not (np.isfinite(x).all() and np.isfinite(y).all()):
                probs.append(f"{t}: line {label!r} has non-finite points")
            elif st[1] != "None" and len(x) > 1 and np.ptp(x) == 0 and np.ptp(y) == 0:
                probs.append(f"{t}: line {label!r} is a single point")
            if st not in styles:
                probs.append(f"{t}: line style {st} ({label!r}) has no legend entry")
        for label, segs in ax["collections"]:
            if label.startswith("_") or label not in labels:
                probs.append(f"{t}: line collection {label!r} has no legend entry")
            if not all(np.isfinite(s).all() for s in segs):
                probs.append(f"{t}: line collection {label!r} has non-finite points")
    return probs


def _boundary_segments(c: np.ndarray, u: np.ndarray, v: np.ndarray) -> list:
    """Line segments between grid cells of different class (cell centres u, v)."""
    du, dv = (u[1] - u[0]) / 2, (v[1] - v[0]) / 2
    i, j = np.nonzero(c[1:] != c[:-1])
    segs = [[(u[a] + du, v[b] - dv), (u[a] + du, v[b] + dv)] for a, b in zip(i, j)]
    i, j = np.nonzero(c[:, 1:] != c[:, :-1])
    segs += [[(u[a] - du, v[b] + dv), (u[a] + du, v[b] + dv)] for a, b in zip(i, j)]
    return segs


def stats_plot(spec, tr, psi, cls, fine, stats: dict, family):
    """``slice_stats.png``: log10 tr g and psi with the eta = 0 class boundaries, the class map
    used for box counting, and the box-counting log-log plot with its fit; the three measurements'
    results in the panel titles. Returns the figure."""
    import matplotlib
    from matplotlib.collections import LineCollection

    plt = _pyplot()
    R1, R2 = spec["grid"]["resolution"]
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    u, v = np.linspace(lo[0], hi[0], R1), np.linspace(lo[1], hi[1], R2)
    du, dv = (u[1] - u[0]) / 2, (v[1] - v[0]) / 2
    box = [lo[0] - du, hi[0] + du, lo[1] - dv, hi[1] + dv]
    segs = _boundary_segments(np.asarray(cls).reshape(R1, R2), u, v)
    fig, axes = plt.subplots(2, 2, figsize=(11, 9.5))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    tr = np.asarray(tr, float)
    ltr = np.where(tr > 0, np.log10(np.where(tr > 0, tr, 1.0)), np.nan)
    rd = stats["ridges"]
    sp = stats.get("psi_trace_spearman")
    panels = [(axes[0, 0], ltr, "log10 tr g [tr g in 1/u^2, 1/v^2]",
               f"log10 tr g (grey: tr g <= 0); ridge points on a boundary {rd['ridge_on_boundary']:.2f}\n"
               f"(chance {rd['ridge_on_boundary_null_mean']:.2f}, shifted-grid p = {rd['ridge_p']:.3f})"),
              (axes[0, 1], psi, "psi [nats]", "psi (vae-digits decoder at the eta=0 z_0)" + (
                  f"\nSpearman(psi, tr g): near boundaries {sp['near']['rho']:.2f}, away {sp['away']['rho']:.2f}"
                  if sp and sp["near"]["rho"] is not None and sp["away"]["rho"] is not None else ""))]
    for ax, val, label, title in panels:
        if val is None or not np.isfinite(np.asarray(val, float)).any():
            ax.text(0.5, 0.5, "not computed (family.psi: false)", transform=ax.transAxes, ha="center")
        else:
            val = np.asarray(val, float).reshape(R1, R2)
            fin = val[np.isfinite(val)]
            a, b = np.percentile(fin, [2, 98])
            im = ax.imshow(np.ma.masked_invalid(val.T), origin="lower", extent=box, aspect="auto", cmap=cmap, vmin=a, vmax=b)
            fig.colorbar(im, ax=ax, shrink=0.8, label=label)
        if segs:
            ax.add_collection(LineCollection(segs, colors="w", linewidths=0.6, label="class boundary of the eta=0 samples"))
            ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("u")
        ax.set_ylabel("v")
    ax = axes[1, 0]
    fc = np.asarray(fine if fine is not None else np.asarray(cls).reshape(R1, R2))
    im = ax.imshow(fc.T, origin="lower", extent=[lo[0], hi[0], lo[1], hi[1]], aspect="auto", cmap="tab10", vmin=-0.5, vmax=9.5)
    fig.colorbar(im, ax=ax, shrink=0.8, label="class of the eta=0 sample [digit 0-9, classifier-digits]", ticks=range(10))
    ax.set_title(f"eta=0 class map, {fc.shape[0]} x {fc.shape[1]} points (box counting)", fontsize=9)
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    ax = axes[1, 1]
    bc = stats["box_counting"]
    if bc.get("dimension") is not None:
        s, n = np.asarray(bc["boxes"], float), np.asarray(bc["counts"], float)
        ax.loglog(s, n, "ko", label="boxes holding a class boundary")
        c = np.exp(np.mean(np.log(n) - bc["dimension"] * np.log(s)))
        lo_i, hi_i = bc["interval"]
        ax.loglog(s, c * s ** bc["dimension"], "r-",
                  label=f"fit: dimension {bc['dimension']:.3f} ({100 * bc['level']:.0f}% CI {lo_i:.3f}-{hi_i:.3f})")
        for d, st in ((1, ":"), (2, "--")):
            ax.loglog(s, n[0] * (s / s[0]) ** d, "0.5", ls=st, label=f"slope {d} ({'smooth curve' if d == 1 else 'filled region'})")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no box counting (class map too small)", transform=ax.transAxes, ha="center")
    ax.set_xlabel("boxes per side s")
    ax.set_ylabel("N(s): boxes holding a boundary pixel")
    ax.set_title("box-counting dimension of the class-boundary set", fontsize=9)
    fig.suptitle(f"{family.model} slice at {R1} x {R2}: metric ridges, psi and class boundaries", fontsize=10)
    fig.tight_layout()
    return fig


def stats_figure(uri, spec, tr, psi, cls, fine, stats, family) -> None:
    """``slice_stats.png``: :func:`stats_plot` written to ``uri``."""
    save_png(stats_plot(spec, tr, psi, cls, fine, stats, family), uri)
