"""The figures of a fisher run: ``fisher.png`` (every family) and ``slice.png`` (diffusion-slice),
written through :func:`geomjobs.analysis.plots.save_png` (local or gs://)."""
from __future__ import annotations

import numpy as np

from geomjobs.analysis.plots import save_png


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fisher_figure(uri: str, spec: dict, family, thetas, F, g, exact, geo) -> None:
    """F and the trace of g over the grid, estimate beside the exact reference where one exists
    (the estimate's F shifted by the affine term that best matches the exact F), geodesics drawn
    on the trace panels (estimated: white; exact metric: red dashes)."""
    from geomjobs.fisher.potential import remove_affine

    plt = _pyplot()
    R1, R2 = spec["grid"]["resolution"]
    lo, hi = spec["grid"]["low"], spec["grid"]["high"]
    ext = [lo[0], hi[0], lo[1], hi[1]]
    names = family.theta_names
    tr = np.trace(g, axis1=1, axis2=2)
    panels = []
    if exact is not None:
        Fa = remove_affine(F, exact["F"], thetas, spec["potential"]["coords"])
        panels += [("F (fitted, affine-aligned)", Fa, None), ("F exact", exact["F"], None),
                   ("tr g (fitted)", tr, "est"), ("tr g exact", np.trace(exact["g"], axis1=1, axis2=2), "exact")]
    else:
        panels += [("F (fitted)", F, None), ("tr g (fitted)", tr, "est"),
                   ("det g (fitted)", np.linalg.det(g), "est")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    tr_max = np.percentile(np.concatenate([p[1] for p in panels if p[2]]), 99)
    for ax, (title, v, kind) in zip(axes, panels):
        kw = {"vmin": 0, "vmax": tr_max} if kind and title.startswith("tr") else {}
        im = ax.imshow(np.asarray(v).reshape(R1, R2).T, origin="lower", extent=ext, aspect="auto", cmap="viridis", **kw)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(names[0])
        ax.set_ylabel(names[1])
        if kind:
            for gd in geo:
                ax.plot(*np.asarray(gd["path"]).T, "w-", lw=1.5)
                if gd.get("exact_path") is not None:
                    ax.plot(*np.asarray(gd["exact_path"]).T, "r--", lw=1.2)
    fig.suptitle(f"Fisher metric: {family.kind} ({spec['posterior']['kind']} posterior)", fontsize=11)
    fig.tight_layout()
    save_png(fig, uri)


def slice_figure(uri, spec, thetas, tr, psi, cls, ridge, family) -> None:
    """log10 tr g and psi side by side; class boundaries of the eta = 0 samples (black) and the metric's
    ridge points (red) on both; the anchors (white stars)."""
    import matplotlib

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
                segs.append(([x, x], [v[j] - dv, v[j] + dv]))
    for i in range(R1):
        for j in range(R2 - 1):
            if c[i, j] != c[i, j + 1]:
                y = v[j] + dv
                segs.append(([u[i] - du, u[i] + du], [y, y]))
    anchors_uv = (family.anchors - family.plane.origin) @ family.plane.basis.T
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    ltr = np.where(tr > 0, np.log10(np.where(tr > 0, tr, 1.0)), np.nan)   # tr g <= 0 (a non-convex fit): grey
    panels = [("log10 tr g (Fisher metric; grey: tr g <= 0)", ltr),
              ("psi (vae-digits decoder at the eta=0 z_0)", psi)]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="0.6")
    for ax, (title, val) in zip(axes, panels):
        val = np.asarray(val, float).reshape(R1, R2)
        if np.isfinite(val).any():
            box = [ext[0] - du, ext[1] + du, ext[2] - dv, ext[3] + dv]
            fin = val[np.isfinite(val)]
            lo_c, hi_c = np.percentile(fin, [2, 98])
            im = ax.imshow(np.ma.masked_invalid(val.T), origin="lower", extent=box, aspect="auto", cmap=cmap, vmin=lo_c, vmax=hi_c)
            fig.colorbar(im, ax=ax, shrink=0.8)
        else:
            ax.text(0.5, 0.5, "psi not computed (family.psi: false)", transform=ax.transAxes, ha="center")
        for xs, ys in segs:
            ax.plot(xs, ys, "k-", lw=1.2)
        rp = thetas[ridge]
        ax.plot(rp[:, 0], rp[:, 1], "r.", ms=4)
        ax.plot(anchors_uv[:, 0], anchors_uv[:, 1], "w*", ms=9, mec="k")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("u")
        ax.set_ylabel("v")
    fig.suptitle(f"{family.model} slice: class boundaries of the eta=0 samples (black), metric ridges (red)", fontsize=10)
    fig.tight_layout()
    save_png(fig, uri)
