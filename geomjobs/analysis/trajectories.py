"""Per-step summaries of ``trajectory`` datasets (latents kind ``trajectory``: one record per
sample and sampler state, ``trajectory_id`` and ``step``, step 0 the noisiest state).

    step_summary(df, values, by=None)         mean and 95 % CI of each value per step (and group)
    final_rows(df)                            each trajectory's last state (its generated sample)
    attach_labels(df, labels, name="group")   a per-trajectory label (e.g. final quality) on every row
    separation(df, value, group, a, b)        a two-sample test of ``value`` between groups a and b at each step
    first_separation(table, alpha=0.05)       where along the path the two groups separate

``df`` is a pandas DataFrame or a pyarrow Table; :func:`step_summary` also takes a DuckDB
relation, and then aggregates in DuckDB (only one row per step and group comes back).
The CI is the t-distribution half-width of :func:`geomjobs.analysis.stats.ci95_halfwidth` and the
per-step test is :func:`geomjobs.analysis.stats.two_sample` (Welch t, Mann-Whitney U, effect sizes).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from geomjobs.analysis.stats import ci95_halfwidth, two_sample

__all__ = ["DESCRIPTORS", "attach_labels", "final_rows", "first_separation", "separation", "step_summary"]

DESCRIPTORS = ("local_scaling", "local_rank", "local_complexity")


def _is_relation(df) -> bool:
    import duckdb

    return isinstance(df, duckdb.DuckDBPyRelation)


def _frame(df) -> pd.DataFrame:
    if isinstance(df, pd.DataFrame):
        return df
    if hasattr(df, "to_pandas"):      # pyarrow Table
        return df.to_pandas()
    if _is_relation(df):
        return df.df()
    raise TypeError(f"expected a pandas DataFrame, a pyarrow Table or a DuckDB relation, got {type(df).__name__}")


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _need(frame: pd.DataFrame, columns) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"columns {missing} are not in the table; it has {list(frame.columns)}")


def _values(values) -> list[str]:
    return [values] if isinstance(values, str) else list(values)


def step_summary(df, values=DESCRIPTORS, *, step: str = "step", by: str | None = None) -> pd.DataFrame:
    """One row per ``step`` (per (``by``, step) when ``by`` names a column, e.g. a per-trajectory
    label): ``count``, ``timestep`` (the smallest timestep of the step's records, when the table
    has that column: all records of one step share it) and, for each v in ``values``, ``<v>_mean``
    and ``<v>_ci95`` (t-distribution half-width, NaN below 2 values). Null values are left out of
    their own column's mean only; ``count`` counts rows. Sorted by (by, step)."""
    values = _values(values)
    keys = ([by] if by else []) + [step]
    if _is_relation(df):
        cols = set(df.columns)
        missing = [c for c in keys + values if c not in cols]
        if missing:
            raise KeyError(f"columns {missing} are not in the relation; it has {df.columns}")
        aggs = ["count(*) AS count"] + (["min(timestep) AS timestep"] if "timestep" in cols else [])
        for v in values:
            aggs += [f"avg({_q(v)}) AS {_q(v + '_mean')}", f"stddev_samp({_q(v)}) AS {_q(v + '__std')}",
                     f"count({_q(v)}) AS {_q(v + '__n')}"]
        group = ", ".join(_q(k) for k in keys)
        out = df.aggregate(", ".join([group] + aggs), group).order(group).df()
    else:
        frame = _frame(df)
        _need(frame, keys + values)
        g = frame.groupby(keys, sort=True, dropna=False)
        out = g.size().rename("count").to_frame()
        if "timestep" in frame.columns:
            out["timestep"] = g["timestep"].min()
        for v in values:
            col = g[v]
            out[v + "_mean"] = col.mean()
            out[v + "__std"] = col.std(ddof=1)
            out[v + "__n"] = col.count()
        out = out.reset_index()
    for v in values:
        out[v + "_ci95"] = ci95_halfwidth(out.pop(v + "__std").to_numpy(np.float64), out.pop(v + "__n").to_numpy(np.float64))
    order = keys + ["count"] + (["timestep"] if "timestep" in out.columns else []) + [c for v in values for c in (v + "_mean", v + "_ci95")]
    out = out[order]
    out["count"] = out["count"].astype(np.int64)
    return out.sort_values(keys).reset_index(drop=True)


def final_rows(df, *, trajectory: str = "trajectory_id", step: str = "step") -> pd.DataFrame:
    """Each trajectory's record at its largest ``step`` (the generated sample), sorted by trajectory."""
    frame = _frame(df)
    _need(frame, [trajectory, step])
    idx = frame.groupby(trajectory, sort=True)[step].idxmax()
    return frame.loc[idx.to_numpy()].sort_values(trajectory).reset_index(drop=True)


def attach_labels(df, labels, *, name: str = "group", trajectory: str = "trajectory_id") -> pd.DataFrame:
    """A copy of ``df`` with column ``name`` = ``labels[trajectory_id]`` on every row (``labels``: a
    mapping or Series indexed by trajectory id). Every trajectory of ``df`` must have a label."""
    frame = _frame(df)
    _need(frame, [trajectory])
    lab = pd.Series(labels)
    missing = np.setdiff1d(frame[trajectory].unique(), lab.index.to_numpy())
    if len(missing):
        raise KeyError(f"no label for trajectories {missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}")
    out = frame.copy()
    out[name] = frame[trajectory].map(lab).to_numpy()
    return out


def separation(df, value: str, group: str, a, b, *, step: str = "step") -> pd.DataFrame:
    """Per ``step``: :func:`geomjobs.analysis.stats.two_sample` of ``value`` between the rows with
    ``group == a`` and those with ``group == b`` (positive t / d / r: group a larger), with the
    step's smallest ``timestep`` when the table has one. Steps where a group has fewer than 2
    finite values are left out."""
    frame = _frame(df)
    _need(frame, [value, group, step])
    rows = []
    for s, part in frame.groupby(step, sort=True):
        va = part.loc[part[group] == a, value].to_numpy(np.float64)
        vb = part.loc[part[group] == b, value].to_numpy(np.float64)
        if np.isfinite(va).sum() < 2 or np.isfinite(vb).sum() < 2:
            continue
        r = {step: s, **({"timestep": part["timestep"].min()} if "timestep" in part.columns else {}), **two_sample(va, vb)}
        rows.append(r)
    cols = [step] + (["timestep"] if "timestep" in frame.columns else []) + ["n_a", "n_b", "mean_a", "mean_b", "t", "t_p", "t_df",
                                                                            "U", "U_p", "cohens_d", "rank_biserial"]
    return pd.DataFrame(rows, columns=cols)


def first_separation(table: pd.DataFrame, alpha: float = 0.05, *, p: str = "t_p", step: str = "step",
                     bonferroni: bool = True) -> dict:
    """Where two groups separate along the path, from a :func:`separation` table: the level is
    ``alpha`` / (number of steps tested) with ``bonferroni`` (default), else ``alpha``.

    Returns ``first`` (the first step with p below the level, None if none), ``from`` (the first
    step from which every later step is below the level: the groups stay apart to the end, None
    if the last step is not), ``steps`` (all steps below the level), ``level`` and ``tested``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    t = table.sort_values(step)
    n = len(t)
    level = alpha / n if (bonferroni and n) else alpha
    below = (t[p].to_numpy(np.float64) < level)
    steps = t[step].to_numpy()
    first = steps[below][0].item() if below.any() else None
    since = None
    if n and below[-1]:
        k = n - 1
        while k > 0 and below[k - 1]:
            k -= 1
        since = steps[k].item()
    return {"first": first, "from": since, "steps": [s.item() for s in steps[below]], "level": level, "tested": n}
