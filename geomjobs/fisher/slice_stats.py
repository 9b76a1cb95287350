"""Statistics of a diffusion slice (``family: {kind: diffusion-slice}``): do the Fisher metric's
ridges lie on the eta = 0 class boundaries, how rough are those boundaries, and do psi and tr g
peak at the same places. Each statistic is a function of maps on the grid (numpy arrays indexed
[u, v]), tested against exact references on synthetic maps in tests/test_slice_stats.py.

- :func:`ridge_boundary_test`: the fraction of tr g's ridge points that lie on a class boundary,
  and the mean rank of tr g on boundary points minus elsewhere, each against the *shifted-grid*
  null: the tr g map (and its ridges) cyclically shifted by random non-zero offsets relative to
  the boundary mask. A shift keeps the map's spatial structure and breaks only its alignment with
  the boundaries, so if tr g is a stationary field independent of the class map, the observed
  alignment is exchangeable with the shifted ones and the Monte Carlo p-value (1 + #{null >=
  observed}) / (1 + shifts) has P(p <= a) <= a: the test's false-pass rate at ``level`` 0.05 is
  at most 5 % (checked on independent synthetic maps by the tests).
- :func:`box_dimension`: the box-counting dimension of a set of pixels (the class-boundary set:
  :func:`boundary_edges` of the eta = 0 class map, pixels whose right or upper neighbour has
  another class, so a straight boundary marks one pixel per row), the least-squares slope of
  log N(s) on log s over s x s boxes (s = 16 ... 256 on a 256 x 256 map), with the slope's
  t-interval (n - 2 degrees of freedom). A smooth curve scores 1, a filled region 2.
- :func:`region_spearman`: Spearman's rank correlation of psi and tr g on points near a class
  boundary (within ``near`` cells) and on the others, each with a block-bootstrap interval
  (blocks of ``block`` x ``block`` cells resampled with replacement: neighbouring points are
  correlated, so resampling single points would give too narrow an interval).
"""
from __future__ import annotations

import numpy as np

LEVEL = 0.05


def boundary_edges(classes: np.ndarray) -> np.ndarray:
    """(R1, R2) bool: pixels whose neighbour at +1 along either axis has another class (each
    boundary edge marked once, on its lower side)."""
    c = np.asarray(classes)
    m = np.zeros(c.shape, bool)
    m[:-1] |= c[1:] != c[:-1]
    m[:, :-1] |= c[:, 1:] != c[:, :-1]
    return m


def box_counts(mask: np.ndarray, boxes) -> np.ndarray:
    """For each s in ``boxes``: the number of the s x s equal boxes tiling the (n, n) mask that
    hold at least one True pixel (n divisible by every s)."""
    m = np.asarray(mask, bool)
    n = m.shape[0]
    if m.shape != (n, n):
        raise ValueError(f"box counting needs a square map, got {m.shape}")
    out = []
    for s in boxes:
        if n % s:
            raise ValueError(f"{s} boxes per side do not tile a {n} x {n} map")
        k = n // s
        out.append(int(m.reshape(s, k, s, k).any(axis=(1, 3)).sum()))
    return np.asarray(out)


def box_dimension(mask: np.ndarray, boxes=None, level: float = 0.95) -> dict:
    """Box-counting dimension of the True pixels of a square map: the least-squares slope of log
    N(s) on log s over ``boxes`` boxes per side (default the powers of two from 16 to the map's
    side), with its ``level`` t-interval. {"dimension", "interval", "boxes", "counts", "r2"}."""
    from scipy import stats

    n = np.asarray(mask).shape[0]
    if boxes is None:
        boxes = [2 ** k for k in range(4, int(np.log2(n)) + 1) if n % 2 ** k == 0]
    boxes = np.asarray(boxes)
    counts = box_counts(mask, boxes)
    if len(boxes) < 3 or (counts == 0).any():
        return {"dimension": None, "interval": None, "boxes": boxes.tolist(), "counts": counts.tolist(), "r2": None}
    x, y = np.log(boxes), np.log(counts)
    fit = stats.linregress(x, y)
    half = stats.t.ppf(0.5 + level / 2, len(x) - 2) * fit.stderr
    return {"dimension": float(fit.slope), "interval": [float(fit.slope - half), float(fit.slope + half)],
            "level": level, "boxes": boxes.tolist(), "counts": counts.tolist(), "r2": float(fit.rvalue ** 2)}


def ridge_mask(s: np.ndarray) -> np.ndarray:
    """Interior points where s is a strict local maximum along u or along v and above its median
    (:func:`geomjobs.fisher.diffusion_slice.ridge_mask`)."""
    from geomjobs.fisher.diffusion_slice import ridge_mask as rm

    return rm(np.asarray(s, float))


def _ranks(s: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(s.ravel()).reshape(s.shape) / s.size


def ridge_boundary_test(trace: np.ndarray, boundary: np.ndarray, shifts: int = 999, seed: int = 0,
                        level: float = LEVEL) -> dict:
    """tr g's ridges against the class boundaries (module docstring), on maps of the grid interior.

    ``trace`` (n1, n2): tr g; ``boundary`` (n1, n2) bool: points next to a class change. Two
    statistics, each with its shifted-grid p-value over ``shifts`` random non-zero cyclic offsets
    (the same offsets for both): ``ridge_on_boundary`` the fraction of ridge points
    (:func:`ridge_mask`) on the boundary (chance: the boundary's share of the map), and
    ``rank_difference`` the mean rank of tr g on the boundary minus elsewhere (ranks / size, so in
    (-1, 1), 0 by chance). ``passes``: the ridge statistic's p <= level."""
    tr = np.asarray(trace, float)
    b = np.asarray(boundary, bool)
    n1, n2 = b.shape
    ridge = ridge_mask(tr)
    r = _ranks(tr)
    rng = np.random.default_rng(seed)
    flat = rng.choice(n1 * n2 - 1, size=min(shifts, n1 * n2 - 1), replace=False) + 1
    offs = np.column_stack(np.divmod(flat, n2))

    def ridge_stat(rm):
        return float(b[rm].mean()) if rm.any() else 0.0

    def rank_stat(rr):
        return float(rr[b].mean() - rr[~b].mean()) if b.any() and (~b).any() else 0.0

    obs_r, obs_k = ridge_stat(ridge), rank_stat(r)
    null_r = np.array([ridge_stat(np.roll(ridge, tuple(o), (0, 1))) for o in offs])
    null_k = np.array([rank_stat(np.roll(r, tuple(o), (0, 1))) for o in offs])
    p_r = (1 + int((null_r >= obs_r - 1e-12).sum())) / (1 + len(offs))
    p_k = (1 + int((null_k >= obs_k - 1e-12).sum())) / (1 + len(offs))
    return {"ridge_points": int(ridge.sum()), "boundary_share": float(b.mean()),
            "ridge_on_boundary": obs_r, "ridge_on_boundary_null_mean": float(null_r.mean()), "ridge_p": p_r,
            "rank_difference": obs_k, "rank_difference_p": p_k, "shifts": int(len(offs)), "level": level,
            "passes": bool(p_r <= level),
            "null": "shifted grid: the tr g map cyclically shifted by random non-zero offsets against the boundary mask; "
                    f"false-pass rate <= {level} for a stationary tr g independent of the classes"}


def spearman(x, y) -> float:
    """Spearman's rank correlation (average ranks for ties): Pearson's r of the ranks."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def near_mask(boundary: np.ndarray, near: int) -> np.ndarray:
    """Points within ``near`` cells (max-norm) of a boundary point."""
    from scipy.ndimage import binary_dilation

    b = np.asarray(boundary, bool)
    return binary_dilation(b, np.ones((2 * near + 1, 2 * near + 1), bool)) if near > 0 else b.copy()


def region_spearman(psi: np.ndarray, trace: np.ndarray, boundary: np.ndarray, near: int = 2, block: int = 8,
                    n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Spearman's rho of psi and tr g over the points near the boundaries (:func:`near_mask`)
    and over the others, each with a ``level`` percentile interval from a block bootstrap:
    the map cut into ``block`` x ``block`` blocks, blocks drawn with replacement ``n_boot``
    times, rho recomputed on the region's points of the drawn blocks."""
    psi, tr = np.asarray(psi, float), np.asarray(trace, float)
    ok = np.isfinite(psi) & np.isfinite(tr)
    nm = near_mask(boundary, near)
    n1, n2 = psi.shape
    bid = (np.arange(n1)[:, None] // block) * (-(-n2 // block)) + np.arange(n2)[None] // block
    nb = int(bid.max()) + 1
    rng = np.random.default_rng(seed)
    out = {"near_cells": near, "block": block, "bootstrap": n_boot, "level": level}
    for name, reg in (("near", nm & ok), ("away", ~nm & ok)):
        if reg.sum() < 3:
            out[name] = {"points": int(reg.sum()), "rho": None, "interval": None}
            continue
        xs, ys, bs = psi[reg], tr[reg], bid[reg]
        members = [np.flatnonzero(bs == k) for k in range(nb)]
        boots = []
        for _ in range(n_boot):
            pick = np.concatenate([members[k] for k in rng.integers(0, nb, nb)])
            if len(pick) >= 3:
                boots.append(spearman(xs[pick], ys[pick]))
        boots = np.asarray([v for v in boots if np.isfinite(v)])
        lo, hi = np.percentile(boots, [50 * (1 - level), 50 * (1 + level)]) if len(boots) else (np.nan, np.nan)
        out[name] = {"points": int(reg.sum()), "rho": spearman(xs, ys), "interval": [float(lo), float(hi)]}
    return out


def slice_statistics(trace: np.ndarray, psi: np.ndarray | None, classes: np.ndarray, fine_classes: np.ndarray | None = None,
                     seed: int = 0) -> dict:
    """The three measurements on a slice's grid maps (R1, R2): tr g, psi (None: not computed), the
    eta = 0 classes; ``fine_classes`` a square class map (e.g. 256 x 256) for the box counting
    (else the grid's own class map where it is square with a side >= 64). Ridges and rank
    correlations are taken over the grid interior (the edge rows' metric is one-sided)."""
    from geomjobs.fisher.diffusion_slice import boundary_mask

    inner = (slice(1, -1), slice(1, -1))
    bnd = boundary_mask(np.asarray(classes))[inner]
    tr = np.asarray(trace, float)[inner]
    res: dict = {"ridges": ridge_boundary_test(tr, bnd, seed=seed)}
    fc = fine_classes if fine_classes is not None else classes
    fc = np.asarray(fc)
    if fc.shape[0] == fc.shape[1] and fc.shape[0] >= 64:
        res["box_counting"] = {"class_map": list(fc.shape), **box_dimension(boundary_edges(fc))}
    else:
        res["box_counting"] = {"class_map": list(fc.shape), "dimension": None,
                               "why": "box counting needs a square class map of side >= 64 (family.class_map)"}
    if psi is not None and np.isfinite(psi).any():
        ps = np.asarray(psi, float)[inner]
        res["psi_trace_spearman"] = region_spearman(ps, tr, bnd, seed=seed)
        if np.isfinite(ps).all():
            # the same ridge test for psi: does psi, too, peak on the boundaries?
            res["psi_ridges"] = ridge_boundary_test(ps, bnd, seed=seed)
    return res
