"""Latents from images (geomjobs/latents/images.py): encoding, forward diffusion, sources, errors, jobs."""
from __future__ import annotations

import copy
import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geomjobs import diffusion, open_dataset, run_job
from geomjobs.errors import SpecError
from geomjobs.generators.vae import BetaVAE, load_vae
from geomjobs.latents import build_latents
from geomjobs.latents.images import ENCODE_BLOCK, ImageLatents
from geomjobs.runner.plan import plan_job
from geomjobs.spec import validate_spec
from geomjobs.zoo.digits import digits_images


def lat_spec(**kw):
    return {"kind": "images", "source": "digits", "encoder": "vae-digits", **kw}


def build(lat):
    return build_latents(validate_spec({"model": {"kind": "zoo", "name": "vae-digits"}, "latents": copy.deepcopy(lat),
                                        "descriptors": {"local_rank": {}}})["latents"])


@pytest.fixture(scope="module")
def vae():
    return load_vae("vae-digits")


def encoder_mean(vae, x):
    module, params, _ = vae
    return np.asarray(module.apply(params, np.asarray(x, np.float32), method=BetaVAE.encode)[0], np.float64)


def test_digits_latents_are_encoder_means_with_ids(vae):
    src = build(lat_spec(count=100))
    assert isinstance(src, ImageLatents) and src.count == 100 and src.shape == (8,)
    ids = np.array([0, 17, 99])
    np.testing.assert_allclose(src.latents(ids), encoder_mean(vae, digits_images()[ids]), rtol=1e-5, atol=1e-6)
    cols = src.columns(ids)
    assert cols["image_id"] == ["digits:0000", "digits:0017", "digits:0099"]
    assert cols["diffusion_t"] == [None] * 3 and cols["noise_seed"] == [None] * 3
    assert build(lat_spec()).count == 1797   # default: every digit


def test_latents_deterministic_per_id_and_independent_of_batching():
    lat = lat_spec(count=3 * ENCODE_BLOCK + 5, diffuse={"t": "random", "seed": 7})
    a, b = build(lat), build(lat)
    n = a.count
    full = a.latents(np.arange(n))
    rng = np.random.default_rng(0)
    order = rng.permutation(n)
    for size in (1, 7, 64, 100):
        got = np.concatenate([b.latents(order[i:i + size]) for i in range(0, n, size)])
        np.testing.assert_array_equal(got, full[order])
    # a fresh source asked for single ids straddling block boundaries gives the same bits
    c = build(lat)
    for i in (ENCODE_BLOCK - 1, ENCODE_BLOCK, n - 1):
        np.testing.assert_array_equal(c.latents(np.array([i]))[0], full[i])
    assert a.columns(order[:5]) == b.columns(order[:5])


def test_forward_diffusion_matches_formula_by_hand():
    ids = np.array([0, 5, 31, 200])
    z0 = build(lat_spec(count=256)).latents(ids)
    src = build(lat_spec(count=256, diffuse={"t": 100, "seed": 11}))
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.prod(1.0 - betas[:101])                   # abar_100 = prod_{s<=100} (1 - beta_s)
    for row, i in zip(src.latents(ids), ids):
        eps = np.random.default_rng([11, int(i)]).standard_normal(8)
        np.testing.assert_allclose(row, np.sqrt(abar) * z0[list(ids).index(i)] + np.sqrt(1 - abar) * eps, rtol=1e-12, atol=1e-12)
    cols = src.columns(ids)
    assert cols["diffusion_t"] == [100] * 4 and cols["noise_seed"] == [11] * 4
    # eps is the latent the gaussian source gives for the same seed
    g = build_latents({"kind": "gaussian", "count": 256, "shape": [8], "seed": 11})
    np.testing.assert_allclose(src.latents(ids), np.sqrt(abar) * z0 + np.sqrt(1 - abar) * g.latents(ids), rtol=1e-12)
    # Stable Diffusion's scaled-linear schedule
    sd_schedule = {"kind": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    sd = build(lat_spec(count=256, diffuse={"t": 999, "seed": 11, "schedule": sd_schedule}))
    ab = np.cumprod(1 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    np.testing.assert_allclose(diffusion.abar(sd.diffuse["schedule"]), ab, rtol=1e-14)
    eps0 = np.random.default_rng([11, 0]).standard_normal(8)
    np.testing.assert_allclose(sd.latents(np.array([0]))[0], np.sqrt(ab[999]) * z0[0] + np.sqrt(1 - ab[999]) * eps0, rtol=1e-12)


def test_random_t_is_reproducible_and_per_sample():
    ids = np.arange(64)
    lat = lat_spec(count=64, diffuse={"t": "random", "seed": 3, "schedule": {"T": 50}})
    a, b = build(lat), build(lat)
    ta, tb = a.columns(ids)["diffusion_t"], b.columns(ids)["diffusion_t"]
    assert ta == tb and all(0 <= t < 50 for t in ta) and len(set(ta)) > 20
    assert ta == [int(np.random.default_rng([3, i, 1]).integers(0, 50)) for i in ids]
    np.testing.assert_array_equal(a.latents(ids), b.latents(ids))
    assert build(lat_spec(count=64, diffuse={"t": "random", "seed": 4, "schedule": {"T": 50}})).columns(ids)["diffusion_t"] != ta
    # the latents follow the formula at each sample's own t
    z0 = build(lat_spec(count=64)).latents(ids)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 50))
    t = np.array(ta)
    eps = np.stack([np.random.default_rng([3, i]).standard_normal(8) for i in ids])
    np.testing.assert_allclose(a.latents(ids), np.sqrt(abar[t])[:, None] * z0 + np.sqrt(1 - abar[t])[:, None] * eps, rtol=1e-12)


def _spec(lat, model=None):
    return {"model": model or {"kind": "zoo", "name": "vae-digits"}, "latents": lat,
            "descriptors": {"local_scaling": {"mode": "exact"}}}


@pytest.mark.parametrize("lat,key", [
    (lat_spec(source="pictures"), "latents.source"),
    ({"kind": "images", "encoder": "vae-digits"}, "latents.source"),
    (lat_spec(source="folder"), "latents.uri"),
    (lat_spec(source="parquet", uri="/nonexistent/x.parquet"), "latents.column"),
    (lat_spec(uri="/tmp"), "latents.uri"),
    (lat_spec(source="folder", uri="/nonexistent/folder"), "latents.uri"),
    (lat_spec(encoder="sd-vae"), "latents.encoder"),
    ({"kind": "images", "source": "digits"}, "latents.encoder"),
    (lat_spec(count=5000), "latents.count"),
    (lat_spec(count=0), "latents.count"),
    (lat_spec(diffuse={"t": -1}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": 1000}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": 20, "schedule": {"T": 10}}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": "sometimes"}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": 2.5}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": True}), "latents.diffuse.t"),
    (lat_spec(diffuse={"seed": 1}), "latents.diffuse.t"),
    (lat_spec(diffuse={"t": 1, "noise": 1}), "latents.diffuse.noise"),
    (lat_spec(diffuse={"t": 1, "schedule": {"kind": "cosine"}}), "latents.diffuse.schedule.kind"),
    (lat_spec(diffuse={"t": 1, "schedule": {"beta_start": 0.02, "beta_end": 0.001}}), "latents.diffuse.schedule.beta_end"),
])
def test_bad_keys_name_the_key(lat, key):
    with pytest.raises(SpecError) as e:
        plan_job(_spec(lat))
    assert e.value.key == key, str(e.value)


def test_latent_shape_must_match_the_model(tmp_path):
    from jobs import write_mlp

    with pytest.raises(SpecError) as e:
        plan_job(_spec(lat_spec(count=4), {"kind": "mlp", "weights": write_mlp(tmp_path)}))   # takes (6,)
    assert e.value.key == "latents.shape"
    assert plan_job(_spec(lat_spec(count=4))).latents.shape == plan_job(_spec(lat_spec(count=4))).generator.latent_shape


def test_folder_source_png_and_npy(tmp_path, vae):
    from PIL import Image

    x = digits_images()[:5]
    folder = tmp_path / "imgs"
    folder.mkdir()
    px = np.round(x * 255).astype(np.uint8)
    Image.fromarray(px[0]).save(folder / "b.png")
    Image.fromarray(px[1]).convert("RGB").save(folder / "a.png")        # colour -> grey
    np.save(folder / "c.npy", x[2])
    np.save(folder / "d.npy", x[3].reshape(64))                          # any shape of 64 values
    (folder / "notes.txt").write_text("ignored")
    src = build(lat_spec(source="folder", uri=str(folder)))
    assert src.count == 4
    assert src.columns(np.arange(4))["image_id"] == ["a.png", "b.png", "c.npy", "d.npy"]
    expect = np.stack([px[1] / 255.0, px[0] / 255.0, x[2], x[3]])
    np.testing.assert_allclose(src.latents(np.arange(4)), encoder_mean(vae, expect), rtol=1e-5, atol=1e-5)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(folder / "e.png")
    with pytest.raises(SpecError, match="e.png") as e:
        build(lat_spec(source="folder", uri=str(folder)))
    assert e.value.key == "latents.uri"
    assert build(lat_spec(source="folder", uri=str(folder), count=4)).count == 4   # only the first 4 are used


def test_parquet_source_lists_and_png_bytes_match_digits(tmp_path):
    from PIL import Image

    x = digits_images()[:70]
    pngs = []
    for img in np.round(x * 255).astype(np.uint8):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    tab = pa.table({"pixels": [row.reshape(-1).tolist() for row in x], "png": pngs,
                    "name": [f"img{i}" for i in range(70)], "scalar": np.arange(70.0)})
    pq.write_table(tab, tmp_path / "imgs.parquet")
    uri = str(tmp_path / "imgs.parquet")
    ids = np.arange(70)
    lists = build(lat_spec(source="parquet", uri=uri, column="pixels", id_column="name"))
    assert lists.count == 70 and lists.columns(ids[:2])["image_id"] == ["img0", "img1"]
    np.testing.assert_array_equal(lists.latents(ids), build(lat_spec(count=70)).latents(ids))   # same pixels, same bits
    png = build(lat_spec(source="parquet", uri=uri, column="png", count=10))
    assert png.columns(ids[:2])["image_id"] == ["row:0", "row:1"]
    # a PNG holds round(x * 255) / 255: its latents are the encodings of exactly those pixels
    # (float32 rounding only: the source encodes blocks of ENCODE_BLOCK images, the reference 10)
    rounded = (np.round(x[:10] * 255).astype(np.uint8) / 255.0).astype(np.float32)
    np.testing.assert_allclose(png.latents(ids[:10]), encoder_mean(load_vae("vae-digits"), rounded), rtol=1e-5, atol=1e-6)
    for col, key in (("scalar", "latents.column"), ("nope", "latents.column")):
        with pytest.raises(SpecError) as e:
            build(lat_spec(source="parquet", uri=uri, column=col))
        assert e.value.key == key
    with pytest.raises(SpecError) as e:
        build(lat_spec(source="parquet", uri=uri, column="pixels", id_column="nope"))
    assert e.value.key == "latents.id_column"


def test_job_end_to_end_writes_image_columns(tmp_path, vae):
    import jax

    spec = {"model": {"kind": "zoo", "name": "vae-digits"},
            "latents": {"kind": "images", "source": "digits", "encoder": "vae-digits", "count": 32,
                        "diffuse": {"t": 100, "seed": 0}},
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": 12, "batch_size": 5}}
    res = run_job(spec, str(tmp_path / "out"))
    assert res.ok and res.rows == 32 and res.num_shards == 3
    df = pd.read_parquet(tmp_path / "out").sort_values("sample_id").reset_index(drop=True)
    np.testing.assert_array_equal(df.sample_id, np.arange(32))
    assert (df.status == "ok").all() and (df.model_id == "vae-digits").all()
    assert list(df.image_id) == [f"digits:{i:04d}" for i in range(32)]
    assert (df.diffusion_t == 100).all() and (df.noise_seed == 0).all()
    assert np.all(np.isfinite(df.local_scaling)) and np.all((df.local_rank >= 1) & (df.local_rank <= 8))
    # psi of one record against the decoder Jacobian at the same latent, by hand
    z = build(spec["latents"]).latents(np.array([7]))[0]
    module, params, _ = vae
    a = np.asarray(jax.jacfwd(lambda zz: module.apply(params, zz, method=BetaVAE.decode).reshape(-1))(np.float32(z)), np.float64)
    s = np.linalg.svd(a, compute_uv=False)
    s = s[s > s[0] * 64 * np.finfo(np.float32).eps]
    np.testing.assert_allclose(df.local_scaling[7], np.log(s).sum(), rtol=1e-3, atol=1e-3)
    # the stored spec says exactly what ran, defaults included
    stored = open_dataset(str(tmp_path / "out")).spec()
    assert stored["latents"]["diffuse"] == {"t": 100, "seed": 0, "schedule": {"kind": "linear", "T": 1000,
                                                                              "beta_start": 1e-4, "beta_end": 0.02}}


def test_the_builder_leaves_the_section_as_it_is_and_resolves_the_defaults():
    lat = lat_spec(diffuse={"t": 5})
    src = build_latents(lat)
    assert lat == lat_spec(diffuse={"t": 5})
    assert src.resolved == {**lat, "count": 1797,
                            "diffuse": {"t": 5, "seed": 0, "schedule": {"kind": "linear", "T": 1000, "beta_start": 1e-4, "beta_end": 0.02}}}
    assert src.diffuse == src.resolved["diffuse"] and src.diffuse is not src.resolved["diffuse"]
    assert build_latents(lat_spec(count=3)).resolved == lat_spec(count=3)
