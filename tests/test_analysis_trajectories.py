"""geomjobs.analysis.trajectories against hand-made trajectory tables with known answers."""
from __future__ import annotations

import math

import duckdb
import numpy as np
import pandas as pd
import pytest
import scipy.stats

from geomjobs.analysis.trajectories import attach_labels, final_rows, first_separation, separation, step_summary

# t_{0.975} quantiles from printed t tables (not from the code under test): df 2 and df 3
T975_DF2, T975_DF3 = 4.302652729911275, 3.182446305284263


def table() -> pd.DataFrame:
    """3 steps x 4 trajectories; psi at (trajectory i, step s) = 10 s + i, timestep = 100 - 40 s."""
    rows = [{"trajectory_id": i, "step": s, "timestep": 100 - 40 * s, "local_scaling": 10.0 * s + i,
             "local_rank": float(s), "local_complexity": (i % 2) * s} for s in range(3) for i in range(4)]
    return pd.DataFrame(rows)


def test_step_summary_means_and_ci_match_closed_form():
    out = step_summary(table())
    assert out["step"].tolist() == [0, 1, 2] and out["count"].tolist() == [4, 4, 4]
    assert out["timestep"].tolist() == [100, 60, 20]
    # psi at a step: 10 s + {0, 1, 2, 3}: mean 10 s + 1.5, sample std sqrt(5/3), CI t_{.975,3} std / 2
    np.testing.assert_allclose(out["local_scaling_mean"], [1.5, 11.5, 21.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out["local_scaling_ci95"], T975_DF3 * math.sqrt(5 / 3) / 2, rtol=1e-9)
    # nu is constant within a step: zero width
    np.testing.assert_allclose(out["local_rank_ci95"], 0.0, atol=1e-12)
    # delta = (i odd) * s: values {0, s, 0, s}: mean s / 2
    np.testing.assert_allclose(out["local_complexity_mean"], [0.0, 0.5, 1.0], atol=1e-12)


def test_step_summary_grouped_by_label_and_nulls():
    df = attach_labels(table(), {0: "lo", 1: "lo", 2: "hi", 3: "hi"}, name="quality")
    df.loc[(df.trajectory_id == 3) & (df.step == 2), "local_scaling"] = np.nan   # one missing value
    out = step_summary(df, ["local_scaling"], by="quality")
    assert list(out.columns) == ["quality", "step", "count", "timestep", "local_scaling_mean", "local_scaling_ci95"]
    hi = out[out.quality == "hi"].set_index("step")
    lo = out[out.quality == "lo"].set_index("step")
    # lo: {10 s, 10 s + 1}, std 1/sqrt(2), CI t_{.975,1} * 0.5 = 12.706 * 0.5
    np.testing.assert_allclose(lo["local_scaling_mean"], [0.5, 10.5, 20.5], atol=1e-12)
    np.testing.assert_allclose(lo["local_scaling_ci95"], 12.706204736174707 * 0.5, rtol=1e-9)
    # hi at step 2 has one finite value (22): mean 22, no CI; the row still counts 2 records
    assert hi.loc[2, "count"] == 2 and hi.loc[2, "local_scaling_mean"] == 22.0 and np.isnan(hi.loc[2, "local_scaling_ci95"])


def test_step_summary_duckdb_relation_equals_pandas():
    rng = np.random.default_rng(0)
    n_traj, steps = 40, 6
    df = pd.DataFrame({"trajectory_id": np.repeat(np.arange(n_traj), steps), "step": np.tile(np.arange(steps), n_traj),
                       "local_scaling": rng.normal(size=n_traj * steps), "local_rank": rng.uniform(1, 3, n_traj * steps)})
    df["timestep"] = 1000 - 100 * df["step"]
    df["group"] = np.where(df.trajectory_id < 15, "a", "b")
    con = duckdb.connect()
    rel = con.from_df(df)
    for by in (None, "group"):
        want = step_summary(df, ["local_scaling", "local_rank"], by=by)
        got = step_summary(rel, ["local_scaling", "local_rank"], by=by)
        assert list(got.columns) == list(want.columns)
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False, rtol=1e-10)


def test_step_summary_names_missing_column():
    with pytest.raises(KeyError, match="local_rank"):
        step_summary(table().drop(columns="local_rank"))


def test_final_rows_and_labels():
    df = table().sample(frac=1.0, random_state=1)           # order must not matter
    last = final_rows(df)
    assert last["trajectory_id"].tolist() == [0, 1, 2, 3] and set(last["step"]) == {2}
    np.testing.assert_array_equal(last["local_scaling"], [20.0, 21.0, 22.0, 23.0])
    with pytest.raises(KeyError, match=r"no label for trajectories \[3\]"):
        attach_labels(df, {0: 1, 1: 1, 2: 0})


def shifted_groups(n: int = 50, shift_from: int = 5, steps: int = 8, shift: float = 3.0) -> pd.DataFrame:
    """Group a at every step: the n normal quantiles; group b: the same values, shifted by ``shift``
    from step ``shift_from`` on (identical before, so the t statistic there is exactly 0)."""
    q = scipy.stats.norm.ppf((np.arange(n) + 0.5) / n)
    rows = []
    for s in range(steps):
        for g, base in (("a", 0), ("b", n)):
            vals = q + (shift if (g == "b" and s >= shift_from) else 0.0)
            rows += [{"trajectory_id": base + i, "step": s, "timestep": 900 - 100 * s, "group": g, "local_scaling": v}
                     for i, v in enumerate(vals)]
    return pd.DataFrame(rows)


def test_separation_matches_scipy_and_finds_the_step():
    df = shifted_groups()
    tab = separation(df, "local_scaling", "group", "b", "a")
    assert tab["step"].tolist() == list(range(8)) and (tab["n_a"] == 50).all()
    # before the shift the two groups are the same values: t = 0, p = 1, rank-biserial 0
    early = tab[tab.step < 5]
    np.testing.assert_allclose(early["t"], 0.0, atol=1e-9)
    np.testing.assert_allclose(early["t_p"], 1.0, atol=1e-9)
    np.testing.assert_allclose(early["rank_biserial"], 0.0, atol=1e-12)
    # after it: the reference Welch test on the same two arrays, and d = shift / pooled std
    q = scipy.stats.norm.ppf((np.arange(50) + 0.5) / 50)
    ref = scipy.stats.ttest_ind(q + 3.0, q, equal_var=False)
    late = tab[tab.step >= 5]
    np.testing.assert_allclose(late["t"], ref.statistic, rtol=1e-10)
    np.testing.assert_allclose(late["t_p"], ref.pvalue, rtol=1e-8)
    np.testing.assert_allclose(late["cohens_d"], 3.0 / q.std(ddof=1), rtol=1e-10)
    sep = first_separation(tab)
    assert sep["first"] == 5 and sep["from"] == 5 and sep["steps"] == [5, 6, 7]
    assert sep["tested"] == 8 and sep["level"] == pytest.approx(0.05 / 8)


def test_first_separation_transient_and_none():
    tab = pd.DataFrame({"step": [0, 1, 2, 3, 4], "t_p": [0.5, 1e-4, 0.3, 1e-5, 1e-6]})
    sep = first_separation(tab, alpha=0.05)
    # level 0.01: steps 1, 3, 4 pass; the groups stay apart only from step 3
    assert sep["first"] == 1 and sep["from"] == 3 and sep["steps"] == [1, 3, 4]
    # without the correction 0.3 < 0.05 is still false: the same answer; with alpha 0.4 all but 0 pass
    assert first_separation(tab, alpha=0.4, bonferroni=False)["from"] == 1
    none = first_separation(pd.DataFrame({"step": [0, 1], "t_p": [0.9, 0.8]}))
    assert none["first"] is None and none["from"] is None and none["steps"] == []
    # separated earlier but not at the end: no "from"
    assert first_separation(pd.DataFrame({"step": [0, 1], "t_p": [1e-9, 0.9]}))["from"] is None


def test_separation_skips_steps_without_two_values_per_group():
    df = shifted_groups(n=3, steps=2)
    df = df[~((df.step == 0) & (df.group == "a") & (df.trajectory_id > 0))]   # group a has 1 row at step 0
    tab = separation(df, "local_scaling", "group", "a", "b")
    assert tab["step"].tolist() == [1]
