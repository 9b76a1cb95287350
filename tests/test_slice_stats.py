"""geomjobs.fisher.slice_stats against exact references on synthetic maps: box counts of sets
whose counts are known exactly (a grid line: N(s) = s; a full map: s^2), dimensions of a circle
(1), a filled disc (2) and a Koch curve (log 4 / log 3); Spearman's rho against scipy's; the
ridge-boundary test's false-pass rate on independent maps and its power on aligned ones."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from scipy.stats import spearmanr

from geomjobs.fisher.slice_stats import (
    boundary_edges,
    box_counts,
    box_dimension,
    near_mask,
    region_spearman,
    ridge_boundary_test,
    slice_statistics,
    spearman,
)


def test_boundary_edges_of_a_straight_split_is_one_pixel_per_row():
    c = np.zeros((16, 16), int)
    c[:, 7:] = 3
    e = boundary_edges(c)
    assert e.sum() == 16 and e[:, 6].all()


def test_box_counts_exact():
    line = np.zeros((256, 256), bool)
    line[:, 5] = True
    np.testing.assert_array_equal(box_counts(line, [16, 32, 64, 128, 256]), [16, 32, 64, 128, 256])
    d = box_dimension(line)
    assert d["dimension"] == pytest.approx(1.0, abs=1e-12) and d["interval"][1] - d["interval"][0] < 1e-9
    full = np.ones((256, 256), bool)
    assert box_dimension(full)["dimension"] == pytest.approx(2.0, abs=1e-12)
    with pytest.raises(ValueError):
        box_counts(np.ones((100, 100), bool), [16])


def _disc(n=256, r=0.37):
    x = (np.arange(n) + 0.5) / n - 0.5
    return (x[:, None] ** 2 + x[None] ** 2 < r * r).astype(int)


def test_smooth_curves_score_one_and_regions_two():
    """A circle's boundary and a diagonal class split score 1 within 0.05 (the pixel staircase and
    the few boxes at 16 x 16 bias it slightly); a filled disc 2 within 0.08 (its boundary boxes
    inflate the coarse counts: measured 1.94)."""
    circ = box_dimension(boundary_edges(_disc()))
    assert circ["dimension"] == pytest.approx(1.0, abs=0.05), circ
    assert circ["interval"][0] <= circ["dimension"] <= circ["interval"][1]
    i = np.arange(256)
    diag = box_dimension(boundary_edges((i[:, None] > 0.6 * i[None] + 20).astype(int)))
    assert diag["dimension"] == pytest.approx(1.0, abs=0.05), diag
    assert box_dimension(_disc().astype(bool))["dimension"] == pytest.approx(2.0, abs=0.08)


def _koch(level=7, n=256):
    pts = np.array([[0.0, 0.0], [1.0, 0.0]])
    rot = np.array([[0.5, -np.sqrt(3) / 2], [np.sqrt(3) / 2, 0.5]])
    for _ in range(level):
        a, b = pts[:-1], pts[1:]
        d = (b - a) / 3
        p1, p3 = a + d, a + 2 * d
        p2 = p1 + d @ rot.T
        pts = np.concatenate([np.stack([a, p1, p2, p3], 1).reshape(-1, 2), pts[-1:]])
    t = np.linspace(0, 1, 8)[None, :, None]
    dense = (pts[:-1, None] + t * (pts[1:, None] - pts[:-1, None])).reshape(-1, 2)
    m = np.zeros((n, n), bool)
    ij = np.minimum((dense * (n - 1)).astype(int), n - 1)
    m[ij[:, 0], ij[:, 1] + n // 4] = True
    return m


def test_koch_curve_scores_its_dimension():
    """The Koch curve (level 7, finer than a pixel of 256) scores log 4 / log 3 = 1.262 within
    0.06 over 16-256 boxes (box counting of a rasterised curve; the interval covers it)."""
    d = box_dimension(_koch())
    assert d["dimension"] == pytest.approx(np.log(4) / np.log(3), abs=0.06), d


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 200).astype(float)
    y = x + rng.normal(size=200)
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_region_spearman_monotone_and_independent():
    rng = np.random.default_rng(1)
    psi = gaussian_filter(rng.normal(size=(48, 48)), 2)
    b = np.zeros((48, 48), bool)
    b[:, 20] = True
    r = region_spearman(psi, np.exp(psi), b, n_boot=200)
    assert r["near"]["rho"] == pytest.approx(1.0) and r["away"]["rho"] == pytest.approx(1.0)
    assert r["near"]["interval"] == pytest.approx([1.0, 1.0])
    assert r["near"]["points"] == near_mask(b, 2).sum() == 48 * 5
    ind = region_spearman(psi, gaussian_filter(rng.normal(size=(48, 48)), 2), b, n_boot=300)
    assert ind["away"]["interval"][0] < 0 < ind["away"]["interval"][1], ind


def _field(rng, n, sigma=2.0):
    return gaussian_filter(rng.normal(size=(n, n)), sigma, mode="wrap")


def test_ridge_test_false_pass_rate_on_independent_maps():
    """tr g and the class map independent stationary fields (periodic smoothed noise; classes the
    sign of another field): of 100 such pairs at most 11 % pass at level 0.05 (5 % + 3 binomial
    sd: the stated false-pass rate)."""
    rng = np.random.default_rng(2)
    passed = 0
    for _ in range(100):
        cls = (_field(rng, 32) > 0).astype(int)
        from geomjobs.fisher.diffusion_slice import boundary_mask

        res = ridge_boundary_test(_field(rng, 32), boundary_mask(cls), shifts=199, seed=int(rng.integers(1 << 30)))
        passed += res["passes"]
    assert passed <= 11, passed


def test_ridge_test_detects_ridges_on_the_boundaries():
    rng = np.random.default_rng(3)
    from geomjobs.fisher.diffusion_slice import boundary_mask

    cls = (_field(rng, 40, 3) > 0).astype(int)
    b = boundary_mask(cls)
    tr = b + 0.05 * rng.normal(size=b.shape)
    res = ridge_boundary_test(tr, b, shifts=199)
    assert res["passes"] and res["ridge_p"] == pytest.approx(1 / 200) and res["rank_difference"] > 0
    assert res["ridge_on_boundary"] > 1.5 * res["boundary_share"]
    assert not ridge_boundary_test(-tr, b, shifts=199)["passes"]


def test_slice_statistics_collects_the_three():
    from geomjobs.fisher.diffusion_slice import boundary_mask

    rng = np.random.default_rng(4)
    cls = (_field(rng, 66, 4) > 0).astype(int)
    tr, psi = _field(rng, 66), _field(rng, 66)
    s = slice_statistics(tr, psi, cls, fine_classes=(_field(rng, 64, 4) > 0).astype(int))
    assert set(s) == {"ridges", "box_counting", "psi_trace_spearman", "psi_ridges"}
    assert s["psi_ridges"] == ridge_boundary_test(psi[1:-1, 1:-1], boundary_mask(cls)[1:-1, 1:-1])
    assert s["box_counting"]["boxes"] == [16, 32, 64]
    small = slice_statistics(tr[:12, :12], None, cls[:12, :12])
    assert small["box_counting"]["dimension"] is None and "psi_trace_spearman" not in small


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_slice_128_example_end_to_end_at_32(tmp_path):
    """examples/fisher/ldm-digits-slice-128.yaml at 32 x 32 points, 4 samples per point, class map
    64 x 64, psi off: the statistics land in fisher.json and slice_stats.png, the box counting runs
    over 16-64 boxes, and a rerun computes no sample shard (resumed)."""
    import json
    from pathlib import Path

    import yaml

    from geomjobs.fisher.job import run_fisher

    raw = yaml.safe_load((Path(__file__).parent.parent / "examples" / "fisher" / "ldm-digits-slice-128.yaml").read_text())
    raw["grid"]["resolution"] = [32, 32]
    raw["samples_per_point"] = 4
    raw["family"].update(class_map=64, psi=False)
    raw["execution"]["shard_size"] = 128
    out = tmp_path / "out"
    s = run_fisher(dict(raw), str(out), progress=False)
    st = json.loads((out / "fisher.json").read_text())["slice"]["stats"]
    assert st == json.loads(json.dumps(s["slice"]["stats"]))
    assert st["box_counting"]["boxes"] == [16, 32, 64]
    d = st["box_counting"]
    assert d["interval"][0] <= d["dimension"] <= d["interval"][1]
    assert 0 < st["ridges"]["ridge_p"] <= 1 and (out / "slice_stats.png").is_file()
    again = run_fisher(dict(raw), str(out), progress=False)
    assert again["sampled_shards"]["computed"] == 0
