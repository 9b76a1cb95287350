"""Statistics over descriptor tables: level sets, on-manifold masks, two-sample tests and
correlation tables. Inputs are pandas DataFrames, pyarrow Tables or (for :func:`level_sets`)
DuckDB relations, where the aggregation runs in DuckDB.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import scipy.stats

__all__ = ["ci95_halfwidth", "correlations", "format_p", "level_set_index", "level_sets", "on_manifold_mask", "two_sample"]


def _frame(df) -> pd.DataFrame:
    if isinstance(df, pd.DataFrame):
        return df
    if hasattr(df, "to_pandas"):   # pyarrow Table / RecordBatch
        return df.to_pandas()
    if hasattr(df, "df") and callable(df.df):   # a DuckDB relation
        return df.df()
    raise TypeError(f"expected a pandas DataFrame, a pyarrow Table or a DuckDB relation, got {type(df).__name__}")


def _is_relation(df) -> bool:
    try:
        import duckdb
    except ImportError:   # pragma: no cover - duckdb is a dependency
        return False
    return isinstance(df, duckdb.DuckDBPyRelation)


def ci95_halfwidth(std, n):
    """Half-width of the two-sided 95 % confidence interval of a mean from n values with sample
    standard deviation ``std`` (ddof 1): t_{0.975, n-1} * std / sqrt(n); NaN where n < 2."""
    std = np.asarray(std, np.float64)
    n = np.asarray(n, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        tq = scipy.stats.t.ppf(0.975, np.where(n >= 2, n - 1, np.nan))
        return np.where(n >= 2, tq * std / np.sqrt(n), np.nan)


def level_sets(df, column: str = "local_scaling", bins: int = 10, values=(), range=None) -> pd.DataFrame:  # noqa: A002
    """Equal-width level sets of ``column``: one row per bin with ``level_set`` (0..bins-1),
    ``lo``, ``hi``, ``count`` and, for each name v in ``values``, ``<v>_mean`` and ``<v>_ci95``
    (the 95 % CI half-width by the t distribution, :func:`ci95_halfwidth`).

    Bins split ``range`` = (lo, hi) (default: the column's min and max) into ``bins`` equal
    intervals [lo + i w, lo + (i + 1) w), the last one closed; bin of x = floor((x - lo) * bins /
    (hi - lo)), x = hi in the last bin. Rows whose ``column`` is null or outside the range are
    left out; every bin is listed, empty ones with count 0 and NaN means. ``df`` may be a DuckDB
    relation: the per-bin count / mean / standard deviation are then computed by DuckDB with the
    same formula, and only ``bins`` rows come back to Python.
    """
    bins = _check_bins(bins)
    values = [values] if isinstance(values, str) else list(values)
    if _is_relation(df):
        agg = _level_sets_duckdb(df, column, bins, values, range)
        lo, hi = agg.attrs["range"]
    else:
        frame = _frame(df)
        for c in [column, *values]:
            if c not in frame.columns:
                raise KeyError(f"column '{c}' is not in the table; it has {list(frame.columns)}")
        x = pd.to_numeric(frame[column], errors="raise").to_numpy(np.float64, na_value=np.nan)
        idx, edges = level_set_index(x, bins, range)
        lo, hi = edges[0], edges[-1]
        keep = idx >= 0
        sub = frame.loc[keep, values].astype(np.float64).assign(_bin=idx[keep])
        g = sub.groupby("_bin")
        agg = pd.DataFrame({"count": g.size()})
        for v in values:
            agg[f"{v}_avg"] = g[v].mean()
            agg[f"{v}_std"] = g[v].std(ddof=1)
            agg[f"{v}_n"] = g[v].count()
    out = pd.DataFrame({"level_set": np.arange(bins)})
    edges = _edges(lo, hi, bins)
    out["lo"], out["hi"] = edges[:-1], edges[1:]
    agg = agg.reindex(np.arange(bins))
    out["count"] = agg["count"].fillna(0).to_numpy(np.int64)
    for v in values:
        n = agg[f"{v}_n"].fillna(0).to_numpy(np.float64)
        out[f"{v}_mean"] = agg[f"{v}_avg"].to_numpy(np.float64)
        out[f"{v}_ci95"] = ci95_halfwidth(agg[f"{v}_std"].to_numpy(np.float64), n)
    return out


def level_set_index(x, bins: int = 10, range=None) -> tuple[np.ndarray, np.ndarray]:  # noqa: A002
    """(level set of each value of ``x``, the ``bins`` + 1 edges) by :func:`level_sets`' rule:
    ``bins`` equal-width bins of ``range`` (default: the finite values' min and max; every value
    equal: [v, v + 1)), bin of x = floor((x - lo) * bins / (hi - lo)), x = hi in the last bin;
    -1 for a value that is not finite or outside the range."""
    bins = _check_bins(bins)
    x = np.asarray(x, np.float64).reshape(-1)
    keep = np.isfinite(x)
    lo, hi = _range(x[keep], range)
    keep &= (x >= lo) & (x <= hi)
    idx = np.full(len(x), -1, np.int64)
    idx[keep] = _bin_index(x[keep], lo, hi, bins)
    return idx, _edges(lo, hi, bins)


def _check_bins(bins) -> int:
    bins = int(bins)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return bins


def _edges(lo: float, hi: float, bins: int) -> np.ndarray:
    return lo + (hi - lo) * np.arange(bins + 1) / bins


def _range(x: np.ndarray, range):  # noqa: A002
    if range is not None:
        lo, hi = float(range[0]), float(range[1])
    elif len(x):
        lo, hi = float(x.min()), float(x.max())
    else:
        raise ValueError("level_sets: the column has no finite values and no range was given")
    if not hi > lo:
        if range is not None:
            raise ValueError(f"level_sets: range must have hi > lo, got {range}")
        hi = lo + 1.0   # every value equal: one value, all in bin 0
    return lo, hi


def _bin_index(x: np.ndarray, lo: float, hi: float, bins: int) -> np.ndarray:
    return np.minimum(np.floor((x - lo) * bins / (hi - lo)), bins - 1).astype(np.int64)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _level_sets_duckdb(rel, column, bins, values, range):  # noqa: A002
    cols = rel.columns
    for c in [column, *values]:
        if c not in cols:
            raise KeyError(f"column '{c}' is not in the relation; it has {cols}")
    x = f"CAST({_q(column)} AS DOUBLE)"
    finite = f"{_q(column)} IS NOT NULL AND isfinite({x})"
    if range is None:
        (mn, mx), = rel.filter(finite).aggregate(f"min({x}), max({x})").fetchall()
        lo, hi = _range(np.array([] if mn is None else [mn, mx], np.float64), None)
    else:
        lo, hi = _range(np.array([]), range)
    lo_s, hi_s = repr(float(lo)), repr(float(hi))
    binx = f"CAST(least(floor(({x} - {lo_s}) * {bins} / ({hi_s} - {lo_s})), {bins - 1}) AS BIGINT)"
    aggs = ["count(*) AS count"]
    for i, v in enumerate(values):
        y = f"CAST({_q(v)} AS DOUBLE)"
        aggs += [f"avg({y}) AS a{i}", f"stddev_samp({y}) AS s{i}", f"count({y}) AS n{i}"]
    sel = rel.filter(f"{finite} AND {x} >= {lo_s} AND {x} <= {hi_s}").select(f"{binx} AS _bin, *")
    res = sel.aggregate(f"_bin, {', '.join(aggs)}", "_bin").df().set_index("_bin")
    agg = pd.DataFrame({"count": res["count"]})
    for i, v in enumerate(values):
        agg[f"{v}_avg"], agg[f"{v}_std"], agg[f"{v}_n"] = res[f"a{i}"], res[f"s{i}"], res[f"n{i}"]
    agg.attrs["range"] = (lo, hi)
    return agg


def on_manifold_mask(points, data, radius: float) -> np.ndarray:
    """Boolean mask: point i is within Euclidean distance ``radius`` (inclusive) of at least one
    row of ``data`` (the union of closed balls around the data points), by a k-d tree."""
    from scipy.spatial import cKDTree

    p = np.asarray(points, np.float64)
    d = np.asarray(data, np.float64)
    if p.ndim != 2 or d.ndim != 2 or p.shape[1] != d.shape[1]:
        raise ValueError(f"points and data must be 2-D with the same number of columns, got {p.shape} and {d.shape}")
    if not radius >= 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if len(d) == 0:
        return np.zeros(len(p), bool)
    dist, _ = cKDTree(d).query(p, k=1)
    return dist <= radius


def two_sample(a, b) -> dict:
    """Two-sample comparison of a against b (NaNs dropped): Welch's t-test (``t``, ``t_p``,
    ``t_df``), the two-sided Mann-Whitney U test (``U``: a's U statistic, ``U_p``), Cohen's d
    (mean difference over the pooled standard deviation, ddof 1) and the rank-biserial
    correlation r = 2 U / (n_a n_b) - 1 = P(a > b) - P(a < b) (ties count half); also the group
    sizes and means. Positive t, d and r: a tends to be larger."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        raise ValueError(f"two_sample needs at least 2 finite values per group, got {na} and {nb}")
    t = scipy.stats.ttest_ind(a, b, equal_var=False)
    va, vb = a.var(ddof=1), b.var(ddof=1)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if va + vb > 0 else math.nan
    mw = scipy.stats.mannwhitneyu(a, b, alternative="two-sided")
    pooled = math.sqrt(((na - 1) * va + (nb - 1) * vb) / (na + nb - 2))
    d = (a.mean() - b.mean()) / pooled if pooled > 0 else math.nan
    return {"n_a": na, "n_b": nb, "mean_a": float(a.mean()), "mean_b": float(b.mean()),
            "t": float(t.statistic), "t_p": float(t.pvalue), "t_df": float(df),
            "U": float(mw.statistic), "U_p": float(mw.pvalue),
            "cohens_d": float(d), "rank_biserial": float(2.0 * mw.statistic / (na * nb) - 1.0)}


def correlations(df, columns, method: str = "spearman") -> pd.DataFrame:
    """The correlation matrix (columns x columns) of ``columns``, Spearman's rho or Pearson's r,
    over the rows where all of them are present (so every entry uses the same rows)."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson', got {method!r}")
    frame = _frame(df)
    columns = list(columns)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table; it has {list(frame.columns)}")
    sub = frame[columns].astype(np.float64).dropna()
    return sub.corr(method=method)


def format_p(p: float, name: str = "p") -> str:
    """A p-value for a sentence: 'p = 0.012' (2 significant digits), 'p < 1e-300' where it
    underflowed to 0."""
    p = float(p)
    if math.isnan(p):
        return f"{name} = nan"
    return f"{name} < 1e-300" if p == 0.0 else f"{name} = {p:.2g}"
