"""geomjobs.analysis against cases with known answers: level sets of evenly spread and uniform
samples (counts against numpy.histogram, means and t confidence intervals by hand, the DuckDB
path equal to the pandas path on a real dataset), on-manifold masks on a hand-made grid, Welch /
Mann-Whitney / effect sizes on samples with known means and orderings, correlation tables,
Vendi of identical / orthogonal sets, slice grids of a grid2d dataset, image mosaics, and
reading the ok rows of real datasets (local, and gs:// on the GCS emulator)."""
import os

import duckdb
import matplotlib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

matplotlib.use("Agg")

import geomjobs.analysis as A  # noqa: E402
from geomjobs import metrics, run_job  # noqa: E402
from geomjobs.latents.sources import Grid2d  # noqa: E402

from jobs import mlp_spec, write_mlp  # noqa: E402

T975_DF9 = 2.262157    # two-sided 95 % t quantile, 9 degrees of freedom (printed t tables: 2.262)


# ---- level sets ---------------------------------------------------------------------------
def test_level_sets_of_evenly_spread_values_have_equal_counts_and_hand_computed_means_and_cis():
    df = pd.DataFrame({"x": np.arange(100.0), "y": np.arange(100.0) * 2 + 1})
    ls = A.level_sets(df, "x", bins=10, values=["x", "y"], range=(0, 100))
    assert list(ls.level_set) == list(range(10))
    np.testing.assert_allclose(ls.lo, np.arange(0, 100, 10.0))
    np.testing.assert_allclose(ls.hi, np.arange(10, 110, 10.0))
    assert list(ls["count"]) == [10] * 10
    np.testing.assert_allclose(ls.x_mean, np.arange(10) * 10 + 4.5)
    np.testing.assert_allclose(ls.y_mean, (np.arange(10) * 10 + 4.5) * 2 + 1)
    sd = np.sqrt(np.sum((np.arange(10) - 4.5) ** 2) / 9)          # 0..9: sd = 3.0277
    # the quantile comes from a printed table to 7 digits: agreement to 1e-6 relative
    np.testing.assert_allclose(ls.x_ci95, T975_DF9 * sd / np.sqrt(10), rtol=1e-6)
    np.testing.assert_allclose(ls.y_ci95, 2 * T975_DF9 * sd / np.sqrt(10), rtol=1e-6)


def test_level_sets_of_a_uniform_sample_match_numpy_histogram_and_brute_force_means():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 3, 5000)
    y = x ** 2 + rng.normal(size=x.size)
    df = pd.DataFrame({"x": x, "y": y})
    ls = A.level_sets(df, "x", bins=7, values=["y"])      # range: min..max, as numpy's default
    counts, edges = np.histogram(x, bins=7)
    # bin edges agree to rounding; random doubles never sit within 1 ulp of an edge here, so the
    # counts are exactly numpy's
    np.testing.assert_allclose(np.r_[ls.lo, ls.hi.iloc[-1]], edges, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(ls["count"], counts)
    assert ls["count"].sum() == len(x)          # the maximum is in the last (closed) bin
    idx = np.minimum(np.searchsorted(edges, x, side="right") - 1, 6)
    for b in range(7):
        yy = y[idx == b]
        assert ls.y_mean[b] == pytest.approx(yy.mean(), rel=1e-12)
        half = scipy.stats.t.interval(0.95, len(yy) - 1, loc=0, scale=scipy.stats.sem(yy))[1]
        assert ls.y_ci95[b] == pytest.approx(half, rel=1e-10)
    # uniform: every bin holds ~ n / 7 (binomial sd ~ 26; 6 sd is a bound no seed should reach)
    assert np.all(np.abs(counts - len(x) / 7) < 6 * np.sqrt(len(x) / 7 * 6 / 7))


def test_level_sets_range_excludes_outside_and_nan_and_lists_empty_bins():
    df = pd.DataFrame({"x": [-1.0, 0.0, 0.5, 1.0, 3.9, 4.0, 4.1, np.nan], "y": [9, 1, 2, 3, 4, 5, 9, 9]})
    ls = A.level_sets(df, "x", bins=4, values=["y"], range=(0, 4))
    assert list(ls["count"]) == [2, 1, 0, 2]        # [0,1): 0, .5   [1,2): 1   [2,3): -   [3,4]: 3.9, 4
    assert np.isnan(ls.y_mean[2]) and np.isnan(ls.y_ci95[2])
    assert ls.y_mean[1] == 3 and np.isnan(ls.y_ci95[1])   # one value: no interval
    assert ls.y_mean[3] == 4.5


def test_level_sets_bad_input_names_the_problem():
    df = pd.DataFrame({"x": [1.0, 2.0]})
    with pytest.raises(KeyError, match="'nope'"):
        A.level_sets(df, "x", values=["nope"])
    with pytest.raises(ValueError, match="bins"):
        A.level_sets(df, "x", bins=0)
    with pytest.raises(ValueError, match="hi > lo"):
        A.level_sets(df, "x", range=(2, 1))


@pytest.fixture(scope="module")
def mlp_dataset(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ds")
    spec = mlp_spec(write_mlp(tmp), count=60, shard_size=16, batch_size=8)
    res = run_job(spec, str(tmp / "out"))
    assert res.ok and res.rows == 60
    return res.uri


def test_level_sets_in_duckdb_equal_the_pandas_result_on_a_real_dataset(mlp_dataset):
    con = duckdb.connect()
    rel = A.duckdb_view(con, "ds", mlp_dataset)
    df = A.read_ok(mlp_dataset)
    for rng_ in (None, (df.local_scaling.min() - 1, df.local_scaling.max() + 0.5)):
        a = A.level_sets(df, "local_scaling", bins=6, values=["local_rank", "local_scaling"], range=rng_)
        b = A.level_sets(rel, "local_scaling", bins=6, values=["local_rank", "local_scaling"], range=rng_)
        # same bin formula in IEEE doubles: identical counts; means / sds differ by summation order only
        np.testing.assert_array_equal(a["count"], b["count"])
        pd.testing.assert_frame_equal(a, b, rtol=1e-9, check_dtype=False)
    assert a["count"].sum() == 60


# ---- on-manifold masks ---------------------------------------------------------------------
def test_on_manifold_mask_on_a_hand_made_grid():
    g = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0), indexing="ij"), -1).reshape(-1, 2)
    data = np.array([[0.0, 0.0], [4.0, 4.0]])
    m = A.on_manifold_mask(g, data, 1.0)
    expect = {(0, 0), (1, 0), (0, 1), (4, 4), (3, 4), (4, 3)}      # closed unit discs
    assert {tuple(p) for p in g[m].astype(int)} == expect
    m2 = A.on_manifold_mask(g, data, np.sqrt(2))
    assert {tuple(p) for p in g[m2].astype(int)} == expect | {(1, 1), (3, 3)}
    assert not A.on_manifold_mask(g, data, 0.5)[1]
    brute = (np.linalg.norm(g[:, None] - data[None], axis=-1) <= 2.5).any(1)
    np.testing.assert_array_equal(A.on_manifold_mask(g, data, 2.5), brute)
    with pytest.raises(ValueError, match="same number of columns"):
        A.on_manifold_mask(g, np.zeros((3, 3)), 1.0)


# ---- two-sample tests ----------------------------------------------------------------------
def test_two_sample_on_samples_with_known_means():
    a, b = [1.0, 2, 3, 4, 5], [3.0, 4, 5, 6, 7]      # means 3 and 5, both variances 2.5
    r = A.two_sample(a, b)
    assert r["mean_a"] == 3 and r["mean_b"] == 5
    assert r["t"] == pytest.approx(-2.0, rel=1e-12)         # -2 / sqrt(2.5/5 + 2.5/5)
    assert r["t_df"] == pytest.approx(8.0, rel=1e-12)       # Welch-Satterthwaite, equal variances: n_a + n_b - 2
    assert r["t_p"] == pytest.approx(0.0805162, abs=1e-6)  # two-sided P(|T_8| > 2), t tables
    assert r["cohens_d"] == pytest.approx(-2 / np.sqrt(2.5), rel=1e-12)
    # U of a = #(a_i > b_j) + #ties / 2: 4 > 3, 5 > 3, 5 > 4 and the ties 3=3, 4=4, 5=5 -> 3 + 1.5
    assert r["U"] == 4.5
    assert r["rank_biserial"] == pytest.approx(2 * 4.5 / 25 - 1)
    assert 0 < r["U_p"] < 1


def test_two_sample_effect_sizes_at_the_extremes_and_against_their_population_values():
    r = A.two_sample([10.0, 11, 12], [1.0, 2, 3, 4])
    assert r["rank_biserial"] == 1.0 and r["U"] == 12      # every a above every b
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 4000), rng.normal(0.5, 1, 4000)
    r = A.two_sample(a, b)
    # population d = -0.5 (SE ~ sqrt(2/n) = 0.022) and r = P(a>b) - P(a<b) = 2 Phi(-0.5/sqrt 2) - 1
    # = -0.276 (SE ~ 0.013): 5 SE
    assert r["cohens_d"] == pytest.approx(-0.5, abs=0.11)
    assert r["rank_biserial"] == pytest.approx(2 * scipy.stats.norm.cdf(-0.5 / np.sqrt(2)) - 1, abs=0.065)
    assert r["t_p"] < 1e-50 and r["U_p"] < 1e-50
    with pytest.raises(ValueError, match="at least 2"):
        A.two_sample([1.0], [1.0, 2.0])
    assert A.format_p(0.0) == "p < 1e-300" and A.format_p(0.0123) == "p = 0.012" and A.format_p(float("nan"), "q") == "q = nan"


# ---- correlations --------------------------------------------------------------------------
def test_correlations_spearman_and_pearson():
    rng = np.random.default_rng(2)
    x = rng.normal(size=300)
    df = pd.DataFrame({"x": x, "exp": np.exp(x), "neg": -3 * x + 1, "noise": rng.normal(size=300)})
    sp = A.correlations(df, ["x", "exp", "neg", "noise"])
    assert sp.loc["x", "exp"] == pytest.approx(1.0) and sp.loc["x", "neg"] == pytest.approx(-1.0)
    assert sp.loc["x", "noise"] == pytest.approx(scipy.stats.spearmanr(x, df.noise).statistic, rel=1e-12)
    pe = A.correlations(df, ["x", "exp", "neg"], method="pearson")
    assert pe.loc["x", "neg"] == pytest.approx(-1.0) and pe.loc["x", "exp"] < 0.99   # exp is not linear
    df.loc[0, "noise"] = np.nan                     # rows with a missing value are left out of every entry
    assert A.correlations(df, ["x", "noise"]).loc["x", "noise"] == pytest.approx(
        scipy.stats.spearmanr(x[1:], df.noise[1:]).statistic, rel=1e-12)
    with pytest.raises(ValueError, match="method"):
        A.correlations(df, ["x"], method="kendall")


# ---- Vendi / Frechet: the one implementation --------------------------------------------------
def test_vendi_and_frechet_are_the_metrics_implementation():
    assert A.vendi_score is metrics.vendi_score and A.frechet_distance is metrics.frechet_distance
    assert A.vendi_score(np.ones((6, 4))) == pytest.approx(1.0)
    assert A.vendi_score(np.eye(5)) == pytest.approx(5.0)


# ---- slices and images -----------------------------------------------------------------------
def test_slice_grid_of_a_grid2d_layout():
    src = Grid2d(12, (2,), (-1.0, 0.0), (1.0, 3.0), (3, 4))
    ids = np.arange(12)
    cols = src.columns(ids)
    df = pd.DataFrame({**cols, "val": cols["u"] + 10 * cols["v"]}).sample(frac=1, random_state=0).iloc[1:]
    us, vs, grid = A.slice_grid(df, "val")
    np.testing.assert_allclose(us, [-1, 0, 1])
    np.testing.assert_allclose(vs, [0, 1, 2, 3])
    expect = us[:, None] + 10 * vs[None, :]
    dropped = src.columns(ids[~np.isin(ids, df.index)])     # the one row left out is NaN
    missing = (np.where(us == dropped["u"][0])[0][0], np.where(vs == dropped["v"][0])[0][0])
    assert np.isnan(grid[missing])
    expect[missing] = np.nan
    np.testing.assert_allclose(grid, expect)
    ax, g2 = A.slice_heatmap(df, "val", anchors=[[0, 0]])
    np.testing.assert_array_equal(np.asarray(ax.images[0].get_array().filled(np.nan)), grid.T)
    with pytest.raises(KeyError, match="'u'"):
        A.slice_grid(df.drop(columns="u"), "val")


def test_image_mosaic_places_images_row_major_with_padding(tmp_path):
    imgs = np.arange(5 * 2 * 3, dtype=float).reshape(5, 2, 3)
    m = A.image_mosaic(imgs, rows=2, pad=1)          # 3 columns
    assert m.shape == (2 * 3 + 1, 3 * 4 + 1)
    np.testing.assert_array_equal(m[1:3, 1:4], imgs[0])
    np.testing.assert_array_equal(m[1:3, 5:8], imgs[1])
    np.testing.assert_array_equal(m[4:6, 1:4], imgs[3])
    assert np.isnan(m[4:6, 9:12]).all() and np.isnan(m[0]).all()
    with pytest.raises(ValueError, match="do not fit"):
        A.image_mosaic(imgs, rows=1, cols=2)
    ax, _ = A.image_grid(imgs / 30, rows=2, title="x")
    path = A.save_figure(ax.figure, tmp_path / "figs", "mosaic")
    assert path == str(tmp_path / "figs" / "mosaic.png") and os.path.getsize(path) > 0


def test_save_png_writes_a_png_through_fsspec_makes_local_folders_and_closes_the_figure(tmp_path):
    import fsspec
    import matplotlib.pyplot as plt

    png = b"\x89PNG\r\n\x1a\n"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    local = tmp_path / "new" / "folder" / "a.png"
    assert A.save_png(fig, str(local), dpi=50) == str(local)
    assert local.read_bytes()[:8] == png and not plt.fignum_exists(fig.number)
    fig, ax = plt.subplots()                                     # a remote filesystem: fsspec's in-memory one
    ax.plot([0, 1], [0, 1])
    A.save_png(fig, "memory://save-png-test/figs/b.png", dpi=50)
    assert fsspec.filesystem("memory").cat("/save-png-test/figs/b.png")[:8] == png and not plt.fignum_exists(fig.number)
    fig = plt.figure()
    fig.savefig = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("render failed"))
    with pytest.raises(RuntimeError, match="render failed"):
        A.save_png(fig, str(tmp_path / "c.png"))
    assert not (tmp_path / "c.png").exists() and not plt.fignum_exists(fig.number)   # nothing written, figure closed


# ---- reading datasets ------------------------------------------------------------------------
def write_parts(root, rows_per_part):
    os.makedirs(os.path.join(root, "_geomjobs"), exist_ok=True)
    sid = 0
    for k, statuses in enumerate(rows_per_part):
        n = len(statuses)
        t = pa.table({"sample_id": pa.array(range(sid, sid + n), pa.int64()), "shard_id": pa.array([k] * n, pa.int32()),
                      "local_scaling": pa.array([float(i) for i in range(sid, sid + n)]), "status": pa.array(statuses)})
        pq.write_table(t, os.path.join(root, f"part-{k:06d}.parquet"))
        sid += n
    # a bookkeeping folder holding a Parquet file must not be read
    pq.write_table(pa.table({"sample_id": [999], "status": ["ok"]}), os.path.join(root, "_geomjobs", "junk.parquet"))


def test_read_ok_and_duckdb_view_on_local_parts(tmp_path):
    root = str(tmp_path / "ds")
    write_parts(root, [["ok", "error", "ok"], ["ok", "ok"]])
    df = A.read_ok(root)
    assert list(df.sample_id) == [0, 2, 3, 4] and set(df.status) == {"ok"}
    assert list(A.read_ok("file://" + root, columns=["local_scaling"]).columns) == ["sample_id", "local_scaling"]
    con = duckdb.connect()
    rel = A.duckdb_view(con, "runs", root)
    assert rel.aggregate("count(*)").fetchall() == [(5,)]
    per_shard = con.sql("SELECT shard_id, count(*) FILTER (status <> 'ok') AS e FROM runs GROUP BY 1 ORDER BY 1").fetchall()
    assert per_shard == [(0, 1), (1, 0)]
    assert A.duckdb_view(con, "oks", root, ok_only=True).aggregate("count(*)").fetchall() == [(4,)]
    with pytest.raises(FileNotFoundError, match="no geomjobs dataset"):
        A.read_ok(str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no Parquet parts"):
        A.read_ok(str(tmp_path / "empty"))
    with pytest.raises(KeyError, match="nope"):
        A.read_ok(root, columns=["nope"])
    with pytest.raises(ValueError, match="identifier"):
        A.duckdb_view(con, "bad name", root)


def test_read_ok_of_a_real_job_is_sorted_and_complete(mlp_dataset):
    df = A.read_ok(mlp_dataset, columns=["local_scaling", "local_rank"])
    assert list(df.sample_id) == list(range(60))
    ref = pd.read_parquet(mlp_dataset).sort_values("sample_id")
    np.testing.assert_array_equal(df.local_scaling, ref.local_scaling)


def test_read_ok_and_duckdb_view_on_gcs(tmp_path):
    from geomjobs.runner.local import run_local

    from ray_cluster import GcsEmulator, serving

    with serving(GcsEmulator()) as em:
        spec = mlp_spec(write_mlp(tmp_path), count=20, shard_size=8, batch_size=8)
        uri = f"gs://{em.bucket}/analysis/ds"
        res = run_local(spec, uri, progress=False)
        assert res.ok
        df = A.read_ok(uri, columns=["local_scaling"])
        assert list(df.sample_id) == list(range(20))
        con = duckdb.connect()
        rel = A.duckdb_view(con, "remote", uri, ok_only=True)
        assert rel.aggregate("count(*)").fetchall() == [(20,)]
        ls = A.level_sets(rel, "local_scaling", bins=3)
        assert ls["count"].sum() == 20


def test_notebook_env_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOMJOBS_NB_FULL", "1")
    monkeypatch.setenv("GEOMJOBS_NB_OUT", str(tmp_path / "o"))
    assert A.notebook_env("x") == (True, str(tmp_path / "o")) and os.path.isdir(tmp_path / "o")
    assert A.notebook_env("x", full=False, out_dir=str(tmp_path / "p")) == (False, str(tmp_path / "p"))
    monkeypatch.setenv("GEOMJOBS_NB_FULL", "maybe")
    with pytest.raises(ValueError, match="GEOMJOBS_NB_FULL"):
        A.notebook_env("x")


def test_trajectory_summaries_are_reexported():
    import geomjobs.analysis.trajectories as traj

    names = list(getattr(traj, "__all__", []))
    assert names and all(getattr(A, n) is getattr(traj, n) for n in names)
    assert set(names) <= set(A.__all__)
