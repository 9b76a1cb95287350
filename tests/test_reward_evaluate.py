"""``geomjobs reward evaluate`` (SPEC section 7) on real datasets: ldm-digits samples (DDIM-8, saved
latents) with psi of the vae-digits decoder, unguided and guided by a random-weight reward folder.
The level-set table is recomputed here from the Parquet records by an independent route (np.digitize
bins, pandas group-by, the vendi-score package for Vendi, classifier-digits on vae-decoded images
for quality), and the bad inputs (unpaired sample ids, different seeds, no saved latents) exit 2
naming the dataset."""
from __future__ import annotations

import shutil
import warnings

import jax
import numpy as np
import pandas as pd
import pytest

from geomjobs import run_job
from geomjobs.analysis.stats import level_set_index
from geomjobs.errors import SpecError
from geomjobs.reward.evaluate import COLUMNS, evaluate
from geomjobs.sampling.reward_net import build_network, init_params, network_config, reward_meta, save_reward

COUNT = 60


def job(out, seed=0, guidance=None, save_latent=True, count=COUNT):
    lat = {"kind": "sampled", "model": {"kind": "zoo", "name": "ldm-digits"}, "sampler": {"kind": "ddim", "steps": 8},
           "count": count, "seed": seed, "save_latent": save_latent, "batch_size": 30}
    if guidance:
        lat["guidance"] = guidance
    spec = {"model": {"kind": "zoo", "name": "vae-digits"}, "latents": lat,
            "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}},
            "execution": {"shard_size": 20, "batch_size": 30}}
    res = run_job(spec, str(out))
    assert res.ok
    return str(out)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("GEOMJOBS_LOCAL_MODE", "process")
    root = tmp_path_factory.mktemp("eval")
    shape, cfg = (8,), network_config((8,), hidden=16, depth=2, temb=8)
    save_reward(str(root / "reward"), init_params(build_network(shape, cfg), 1),
                reward_meta(shape, 1000, (0, 999), "local_scaling", cfg, {"z_mean": 0.0, "z_std": 1.0, "y_mean": 0.0, "y_std": 5.0}))
    g = {"reward": str(root / "reward")}
    return {"base": job(root / "base"), "up": job(root / "up", guidance={**g, "scale": 3.0}),
            "down": job(root / "down", guidance={**g, "scale": -3.0}), "root": root}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_level_sets_are_ten_equal_width_bins_of_the_baseline_range():
    psi = np.array([0.0, 0.05, 0.1, 0.35, 0.999, 1.0])
    idx, edges = level_set_index(psi)                             # the rule evaluate uses, 10 bins
    np.testing.assert_allclose(edges, np.linspace(0, 1, 11))
    assert idx.tolist() == [0, 0, 1, 3, 9, 9]                     # the maximum is in the last bin
    assert level_set_index(np.full(4, 2.0))[0].tolist() == [0, 0, 0, 0]


def test_levelsets_table_against_an_independent_recomputation(datasets, tmp_path, monkeypatch):
    from figures import assert_figure_draws_data, figure_saved_as, record_figures
    from vendi_score import vendi

    from geomjobs.generators import build_generator
    from geomjobs.generators.classifier import load_classifier

    saved = record_figures(monkeypatch)
    res = evaluate(datasets["base"], [datasets["up"], datasets["down"]], str(tmp_path / "ev"))
    t = pd.read_parquet(tmp_path / "ev" / "levelsets.parquet")
    assert list(t.columns) == list(COLUMNS) and len(t) == 30 and res["png"] == str(tmp_path / "ev" / "levelsets.png")
    # levelsets.png draws the table: per dataset, psi_mean (with its CI), Vendi and quality per level set
    fig = figure_saved_as(saved, "levelsets.png")
    assert_figure_draws_data(fig, "levelsets.png")
    psi_ax, vendi_ax, quality_ax = fig.axes[:3]
    for k, (_, g) in enumerate(t.groupby("dataset", sort=False)):
        g = g.sort_values("level_set")
        np.testing.assert_array_equal(np.asarray(psi_ax.containers[k].lines[0].get_ydata(), float), g.psi_mean.astype(float))
        np.testing.assert_array_equal(vendi_ax.lines[k].get_ydata(), g.vendi.astype(float))
        np.testing.assert_array_equal(quality_ax.lines[k].get_ydata(), g.quality.astype(float))
    assert t.level_set.dtype == np.int64 and t["count"].dtype == np.int64
    assert sorted(t.guidance_scale.unique()) == [-3.0, 0.0, 3.0]
    base = pd.read_parquet(datasets["base"]).sort_values("sample_id")
    psi0 = base.local_scaling.to_numpy()
    inner = np.linspace(psi0.min(), psi0.max(), 11)[1:-1]
    bins = np.digitize(psi0, inner)                               # 0..9; the maximum lands in 9
    dec = build_generator({"kind": "zoo", "name": "vae-digits"})
    clf = load_classifier()
    for uri, scale in [(datasets["base"], 0.0), (datasets["up"], 3.0), (datasets["down"], -3.0)]:
        df = pd.read_parquet(uri).sort_values("sample_id")
        assert (df.status == "ok").all() and np.array_equal(df.sample_id, base.sample_id)
        z = np.stack(df.z.to_numpy()).astype(np.float32)
        img = np.clip(np.asarray(jax.vmap(lambda v: dec.apply(dec.params, v))(z)), 0, 1).reshape(-1, 8, 8)
        feats, conf = clf.features(img), clf.probs(img).max(-1)
        got = t[t.dataset == uri].set_index("level_set")
        assert (got.guidance_scale == scale).all() and got["count"].sum() == COUNT
        for b in range(10):
            m = bins == b
            row = got.loc[b]
            assert row["count"] == m.sum()
            if m.sum() == 0:
                assert pd.isna(row.psi_mean) and pd.isna(row.vendi)
                continue
            psi = df.local_scaling.to_numpy()[m]
            # the same float64 numbers summed in another order: 1e-12 relative
            assert row.psi_mean == pytest.approx(psi.mean(), rel=1e-12)
            if m.sum() >= 2:
                assert row.psi_ci95 == pytest.approx(1.96 * psi.std(ddof=1) / np.sqrt(m.sum()), rel=1e-4)   # 1.96 vs 1.95996
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                want_v = vendi.score_X(feats[m].astype(np.float64), q=1)
            # float32 classifier features, two eigen-solvers: 1e-5 relative
            assert row.vendi == pytest.approx(want_v, rel=1e-5)
            assert row.quality == pytest.approx(conf[m].mean(), rel=1e-5)
            assert row.features == "classifier-digits"
    summary = res["datasets"]
    assert len(summary) == 3 and summary.fd_heldout.notna().all() and (summary.fd_heldout > 0).all()
    # guidance changed the samples (the reward is random, so no direction is claimed here)
    up = pd.read_parquet(datasets["up"]).sort_values("sample_id")
    assert np.abs(up.local_scaling.to_numpy() - psi0).max() > 1e-3


def test_the_cli_writes_the_table_and_prints_a_line_per_dataset(datasets, tmp_path, capsys):
    from geomjobs.cli import main

    assert main(["reward", "evaluate", datasets["base"], datasets["up"], "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "scale 0:" in out and "scale 3:" in out and "FD to held-out digits" in out
    assert len(pd.read_parquet(tmp_path / "cli" / "levelsets.parquet")) == 20


def test_unpaired_datasets_exit_2_naming_the_dataset(datasets, tmp_path, capsys):
    from geomjobs.cli import main

    partial = tmp_path / "partial"
    shutil.copytree(datasets["up"], partial)
    for f in (partial / "_geomjobs").glob("manifest*"):
        f.unlink()
    (partial / "_geomjobs" / "shards" / "000001.json").unlink()   # shard 1 (samples 20..39) uncommitted
    other_seed = job(tmp_path / "seed1", seed=1)
    no_z = job(tmp_path / "noz", save_latent=False, count=20)
    cases = [(str(partial), "sample ids do not pair up"), (other_seed, "seeds differ"),
             (no_z, "save_latent: true"), (str(tmp_path / "nothing"), "not a geomjobs dataset")]
    for uri, msg in cases:
        with pytest.raises(SpecError) as e:
            evaluate(datasets["base"], [uri], str(tmp_path / "never"))
        assert e.value.key == uri and msg in e.value.message, e.value
        assert main(["reward", "evaluate", datasets["base"], uri, "--out", str(tmp_path / "never")]) == 2
        assert uri in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------
# the SD path, on the tiny random-weight diffusers pipeline
# --------------------------------------------------------------------------------------------

@pytest.mark.slow            # 14 min measured on the shared 2-core CPU at load 18 (VAE encoder, decoder JVPs, UNet sampler compiles)
@pytest.mark.timeout(1200)
def test_the_same_commands_on_the_tiny_diffusers_pipeline(tmp_path, monkeypatch, capsys):
    """PNGs -> the pipeline's VAE encoder -> diffuse to random t (SD's schedule) -> decoder psi at z_t
    (reward data); `reward train`; UNet DDIM sampled jobs at scales 0 and 30 (window = the reward's
    t range) with decoder psi; `reward evaluate` (latent features: no quality network for SD).
    Scale 0 is bitwise the unguided sampler; the guided latents differ."""
    import json

    import yaml

    from geomjobs.cli import main
    from geomjobs.latents import build_latents
    from geomjobs.spec import validate_spec

    from diffusers_tiny import png_folder, quiet, write_pipeline

    quiet()
    monkeypatch.setenv("GEOMJOBS_LOCAL_MODE", "process")
    pipe = write_pipeline(tmp_path / "pipe")
    folder, _ = png_folder(tmp_path, n=12)
    sched = {"kind": "scaled_linear", "T": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    vae = {"kind": "diffusers-vae-decoder", "path": str(pipe["root"]), "subfolder": "vae"}
    desc = {"local_scaling": {"mode": "projection", "k": 6, "chunk": 6}, "local_rank": {}}
    data = {"model": vae, "latents": {"kind": "images", "source": "folder", "uri": str(folder),
                                      "encoder": {"kind": "diffusers-vae", "path": str(pipe["root"]), "subfolder": "vae"},
                                      "diffuse": {"t": "random", "seed": 0, "schedule": sched}},
            "descriptors": desc, "execution": {"shard_size": 6, "batch_size": 6}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    assert main(["run", str(tmp_path / "data.yaml"), "--out", str(tmp_path / "data"), "-q"]) == 0
    reward = str(tmp_path / "reward")
    assert main(["reward", "train", str(tmp_path / "data"), "--out", reward, "--steps", "20", "--eval-every", "10",
                 "--batch-size", "8", "--val-fraction", "0.25", "--hidden", "16", "--channels", "4", "-q"]) == 0
    meta = json.loads((tmp_path / "reward" / "reward.json").read_text())
    assert meta["latent_shape"] == [4, 4, 4] and meta["num_train_timesteps"] == 1000
    window = [int(np.ceil(meta["t_range"][0])), int(np.floor(meta["t_range"][1]))]
    unet = {"kind": "diffusers-unet", "path": str(pipe["root"]), "subfolder": "unet",
            "prompt_embeddings": str(pipe["root"] / "prompts.npz"), "prompt_index": 1}

    def sampled(scale):
        return {"model": vae, "latents": {"kind": "sampled", "model": unet, "sampler": {"kind": "ddim", "steps": 4},
                                          "guidance": {"reward": reward, "scale": scale, "window": window},
                                          "count": 4, "seed": 1, "save_latent": True, "batch_size": 2},
                "descriptors": desc, "execution": {"shard_size": 2, "batch_size": 2}}

    uris = {}
    for s in (0.0, 30.0):
        (tmp_path / f"s{s:g}.yaml").write_text(yaml.safe_dump(sampled(s)))
        uris[s] = str(tmp_path / f"sampled{s:g}")
        assert main(["run", str(tmp_path / f"s{s:g}.yaml"), "--out", uris[s], "-q"]) == 0
    z0 = np.stack(pd.read_parquet(uris[0.0]).sort_values("sample_id").z.to_numpy())
    z30 = np.stack(pd.read_parquet(uris[30.0]).sort_values("sample_id").z.to_numpy())
    plain = sampled(0.0)["latents"]
    plain.pop("guidance")
    ref = build_latents(validate_spec({**sampled(0.0), "latents": plain})["latents"]).latents(np.arange(4))
    assert np.array_equal(z0, ref.reshape(4, -1))
    assert np.abs(z30 - z0).max() > 1e-4
    capsys.readouterr()
    assert main(["reward", "evaluate", uris[0.0], uris[30.0], "--out", str(tmp_path / "ev")]) == 0
    t = pd.read_parquet(tmp_path / "ev" / "levelsets.parquet")
    assert (t.features == "latent").all() and t.quality.isna().all() and t["count"].sum() == 8
    assert "scale 30:" in capsys.readouterr().out
