"""Latent sources: determinism per sample id, grids and planes with known coordinates."""
import numpy as np
import pandas as pd
import pytest

from geomjobs.errors import SpecError
from geomjobs.latents import build_latents


def test_gaussian_latent_depends_only_on_seed_and_id():
    src = build_latents({"kind": "gaussian", "count": 100, "shape": [2, 3], "seed": 5, "scale": 2.0})
    a = src.latents(np.arange(100))
    assert a.shape == (100, 2, 3)
    np.testing.assert_array_equal(src.latents(np.array([42, 7])), a[[42, 7]])
    other = build_latents({"kind": "gaussian", "count": 100, "shape": [2, 3], "seed": 6, "scale": 2.0})
    assert not np.allclose(other.latents(np.arange(3)), a[:3])
    # sample i is scale * default_rng([seed, i]).standard_normal(shape), exactly (SPEC section 5)
    np.testing.assert_array_equal(a, np.stack([2.0 * np.random.default_rng([5, i]).standard_normal((2, 3)) for i in range(100)]))


def test_grid2d_is_row_major_over_the_box():
    src = build_latents({"kind": "grid2d", "low": [-6, -2], "high": [6, 2], "resolution": [4, 3]})
    assert src.count == 12 and src.shape == (2,)
    z = src.latents(np.arange(12))
    np.testing.assert_allclose(z[0], [-6, -2])
    np.testing.assert_allclose(z[2], [-6, 2])
    np.testing.assert_allclose(z[3], [-2, -2])
    np.testing.assert_allclose(z[11], [6, 2])
    cols = src.columns(np.arange(12))
    np.testing.assert_allclose(np.stack([cols["u"], cols["v"]], 1), z)


def test_plane3_grid_lies_on_the_plane_and_keeps_coordinates():
    rng = np.random.default_rng(0)
    anchors = rng.standard_normal((3, 10))
    src = build_latents({"kind": "plane3", "anchors": anchors.tolist(), "resolution": [5, 7], "margin": 0.1})
    ids = np.arange(src.count)
    z = src.latents(ids)
    cols = src.columns(ids)
    # every point = a0 + u e1 + v e2 with orthonormal e1, e2 spanning the anchors' plane
    e = src.basis
    np.testing.assert_allclose(e @ e.T, np.eye(2), atol=1e-12)
    np.testing.assert_allclose(z, anchors[0] + cols["u"][:, None] * e[0] + cols["v"][:, None] * e[1], atol=1e-12)
    # the anchors are in the plane: their residual after projection is zero
    for a in anchors:
        r = (a - anchors[0]) - ((a - anchors[0]) @ e.T) @ e
        assert np.linalg.norm(r) < 1e-10
    # and inside the grid's box
    uv = (anchors - anchors[0]) @ e.T
    assert (uv.min(0) >= [cols["u"].min(), cols["v"].min()]).all()
    assert (uv.max(0) <= [cols["u"].max(), cols["v"].max()]).all()


def test_plane3_rejects_collinear_anchors():
    with pytest.raises(SpecError, match="collinear"):
        build_latents({"kind": "plane3", "anchors": [[0, 0, 0], [1, 1, 1], [2, 2, 2]], "resolution": [2, 2]})


def test_parquet_latents_read_rows_by_id_and_check_the_column(tmp_path):
    z = np.random.default_rng(1).standard_normal((9, 4))
    pd.DataFrame({"id": range(9), "z": list(z)}).to_parquet(tmp_path / "l.parquet")
    src = build_latents({"kind": "parquet", "uri": str(tmp_path / "l.parquet"), "column": "z", "shape": [2, 2]})
    assert src.count == 9 and src.shape == (2, 2)
    np.testing.assert_array_equal(src.latents(np.array([8, 0])), z[[8, 0]].reshape(2, 2, 2))
    with pytest.raises(SpecError, match=r"latents.column'.*'zz' is not in"):
        build_latents({"kind": "parquet", "uri": str(tmp_path / "l.parquet"), "column": "zz"})
    with pytest.raises(SpecError, match=r"must hold lists of numbers"):
        build_latents({"kind": "parquet", "uri": str(tmp_path / "l.parquet"), "column": "id"})
    with pytest.raises(SpecError, match=r"latents.count'.*has 9 rows"):
        build_latents({"kind": "parquet", "uri": str(tmp_path / "l.parquet"), "column": "z", "count": 10})
    with pytest.raises(SpecError, match=r"latents.uri'.*do not exist"):
        build_latents({"kind": "parquet", "uri": str(tmp_path / "none.parquet"), "column": "z"})


def test_ragged_parquet_latents_are_refused_before_any_work_naming_the_first_bad_row(tmp_path):
    """A list column whose rows do not all hold prod(shape) values used to fail mid-job (a poison
    shard: "cannot reshape array of size 5 into shape (3,2)"); it is a SpecError at build time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [[float(j) for j in range(6)]] * 4 + [[1.0] * 5] + [[0.0] * 6] + [[2.0] * 7]
    pq.write_table(pa.table({"z": rows}), tmp_path / "ragged.parquet")
    spec = {"kind": "parquet", "uri": str(tmp_path / "ragged.parquet"), "column": "z", "shape": [3, 2]}
    with pytest.raises(SpecError, match=r"latents.column'.*row 4 of column 'z'.*holds 5 values, expected 6") as e:
        build_latents(spec)
    assert e.value.key == "latents.column"
    # rows past count are not used, so they are not checked; within count, a null row is named too
    assert build_latents({**spec, "count": 4}).latents(np.arange(4)).shape == (4, 3, 2)
    pq.write_table(pa.table({"z": rows[:2] + [None] + rows[:1]}), tmp_path / "null.parquet")
    with pytest.raises(SpecError, match=r"row 2 of column 'z'.*is null"):
        build_latents({**spec, "uri": str(tmp_path / "null.parquet")})
    # and through the whole job: exit before any shard runs
    from geomjobs.runner.plan import plan_job
    with pytest.raises(SpecError, match="row 4"):
        plan_job({"model": {"kind": "zoo", "name": "vae-digits"}, "latents": {**spec, "shape": [6]},
                  "descriptors": {"local_rank": {}}})
