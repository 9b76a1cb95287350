"""The shipped DDPM on a 2-D mixture of Gaussians (geomjobs/generators/ddpm.py, geomjobs/zoo/).

References: the generator and its Jacobian against the eps-MLP's forward pass and chain rule
written by hand in NumPy from the loaded weights; the sample-quality criterion against an
untrained control (the trained model's figures are artifact checks of the shipped weights)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs import diffusion
from geomjobs.generators.ddpm import ZOO_FILES, ddpm_generator, load_ddpm, zoo_path
from geomjobs.zoo.gmm2d import gmm_modes, mode_stats, sample

from references import numpy_mlp_jacobian


def alpha_bar(t, schedule: dict):
    """abar_t as the DDPM generator uses it: the float64 schedule rounded to float32."""
    return diffusion.abar(schedule).astype(np.float32)[t]

# Artifact check of the shipped weights (figures from training, 2000 samples, seed 0): 99.6% of
# samples within 1.0 of the nearest mode (the true mixture gives 99.6%), every mode holding
# 11.6-13.7% of all samples. The untrained control (same architecture, random init) scores 0%
# (its samples blow up to |x| ~ 1e3), so the thresholds below separate trained from untrained.
NEAR_RADIUS = 1.0
MIN_FRAC_NEAR = 0.95
MIN_MODE_SHARE = 0.08


@pytest.fixture(scope="module")
def shipped():
    return load_ddpm("ddpm-gmm2d")


def numpy_eps(params, meta, x, t):
    """eps_theta(x, t) of the EpsMLP by hand: [x, sin/cos embedding of t] -> (Dense, ReLU)* -> Dense,
    and its dense Jacobian in x (the chain rule through the ReLU masks), in float64."""
    arch = meta["architecture"]
    half = arch["emb_dim"] // 2
    freqs = np.exp(-np.log(arch["max_period"]) * np.arange(half) / max(half - 1, 1))
    h = np.concatenate([np.asarray(x, np.float64), np.sin(t * freqs), np.cos(t * freqs)])
    p = params["params"]
    layers = [(np.asarray(p[f"Dense_{i}"]["kernel"], np.float64), np.asarray(p[f"Dense_{i}"]["bias"], np.float64))
              for i in range(arch["depth"] + 1)]
    out = h
    for i, (w, b) in enumerate(layers):
        out = out @ w + b
        if i < len(layers) - 1:
            out = np.maximum(out, 0)
    return out, numpy_mlp_jacobian(layers, h)[:, : len(x)]


def _meets_criterion(x, modes) -> tuple[bool, dict]:
    s = mode_stats(x, modes, NEAR_RADIUS)
    return s["frac_near"] >= MIN_FRAC_NEAR and s["min_mode_share"] >= MIN_MODE_SHARE, s


def test_shipped_files_exist_and_are_small():
    for stem in ZOO_FILES.values():
        npz, js = zoo_path(stem).with_suffix(".npz"), zoo_path(stem).with_suffix(".json")
        assert npz.is_file() and js.is_file()
        assert npz.stat().st_size + js.stat().st_size < 1_000_000


def test_shipped_model_loads(shipped):
    module, params, meta = shipped
    assert meta["schedule"]["T"] == 100
    assert meta["architecture"]["activation"] == "relu"
    assert meta["command"].startswith("python -m geomjobs.zoo.train_ddpm_gmm2d")
    leaves = jax.tree_util.tree_leaves(params)
    assert leaves and all(leaf.dtype == jnp.float32 for leaf in leaves)
    ab = np.asarray(alpha_bar(np.arange(100), meta["schedule"]))
    assert ab.dtype == np.float32 and np.all(np.diff(ab) < 0) and 0.99 < ab[0] < 1 and ab[-1] < 1e-3


@pytest.mark.parametrize("prediction", ["eps", "x0"])
def test_generator_shapes_and_jit_vmap(shipped, prediction):
    _, params, meta = shipped
    gen = ddpm_generator("ddpm-gmm2d", timestep=10, prediction=prediction)
    assert gen.model_id == "ddpm-gmm2d"
    assert gen.timestep == 10
    assert gen.latent_shape == (2,) and gen.output_shape == (2,)
    assert gen.dtype == jnp.float32
    z = jnp.asarray(np.random.default_rng(0).standard_normal((64, 2)), jnp.float32)
    out = jax.jit(jax.vmap(gen.flat_fn()))(z)
    assert out.shape == (64, 2) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))
    ref = np.stack([np.asarray(gen.apply(gen.params, zi)) for zi in z[:4]])
    np.testing.assert_allclose(np.asarray(out[:4]), ref, rtol=1e-5, atol=1e-6)
    # G and its Jacobian against the forward pass and chain rule by hand (float32 model)
    eps, j_eps = numpy_eps(params, meta, np.asarray(z[0], np.float64), 10)
    a = float(alpha_bar(10, meta["schedule"]))
    want, want_j = (eps, j_eps) if prediction == "eps" else ((np.asarray(z[0]) - np.sqrt(1 - a) * eps) / np.sqrt(a),
                                                               (np.eye(2) - np.sqrt(1 - a) * j_eps) / np.sqrt(a))
    np.testing.assert_allclose(np.asarray(out[0], np.float64), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jacfwd(gen.flat_fn())(z[0]), np.float64), want_j, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t", [0, 10, 50, 99])
def test_x0_prediction_matches_eps(shipped, t):
    _, _, meta = shipped
    g_eps = ddpm_generator("ddpm-gmm2d", timestep=t, prediction="eps")
    g_x0 = ddpm_generator("ddpm-gmm2d", timestep=t, prediction="x0")
    xt = jnp.asarray(np.random.default_rng(t).standard_normal((32, 2)) * 3, jnp.float32)
    eps = np.asarray(jax.vmap(g_eps.flat_fn())(xt), np.float64)
    x0 = np.asarray(jax.vmap(g_x0.flat_fn())(xt), np.float64)
    abar = float(alpha_bar(t, meta["schedule"]))
    want = (np.asarray(xt, np.float64) - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    np.testing.assert_allclose(x0, want, rtol=1e-5, atol=1e-5 / np.sqrt(abar))
    if t == 0:  # abar_0 ~ 1: predicted x_0 is x_t up to a little noise
        assert np.max(np.abs(x0 - np.asarray(xt))) < 0.1


def test_trained_samples_land_on_modes_untrained_do_not(shipped):
    module, params, meta = shipped
    d = meta["data"]
    modes = gmm_modes(d["n_modes"], d["radius"])

    ok, stats = _meets_criterion(sample(module, params, meta, 2000, seed=0), modes)
    assert ok, f"trained model fails the sample-quality criterion: {stats}"

    rand = module.init(jax.random.PRNGKey(1), jnp.zeros((2,), jnp.float32), jnp.zeros((), jnp.int32))
    ok_rand, stats_rand = _meets_criterion(sample(module, rand, meta, 2000, seed=0), modes)
    assert not ok_rand, f"an untrained network passes the criterion, so it proves nothing: {stats_rand}"


def test_sampling_is_deterministic(shipped):
    module, params, meta = shipped
    a, b = sample(module, params, meta, 16, seed=3), sample(module, params, meta, 16, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, sample(module, params, meta, 16, seed=4))


@pytest.mark.parametrize("t", [-1, 100, 1000])
def test_bad_timestep(t):
    with pytest.raises(ValueError, match=r"\[0, 99\]"):
        ddpm_generator("ddpm-gmm2d", timestep=t)


@pytest.mark.parametrize("t", [1.5, "10", True])
def test_non_integer_timestep(t):
    with pytest.raises(ValueError, match=r"integer in \[0, 99\]"):
        ddpm_generator("ddpm-gmm2d", timestep=t)


def test_bad_prediction():
    with pytest.raises(ValueError, match=r"prediction must be one of \['eps', 'x0'\].*'v'"):
        ddpm_generator("ddpm-gmm2d", timestep=10, prediction="v")


def test_unknown_zoo_name():
    with pytest.raises(ValueError, match=r"unknown DDPM zoo model 'ddpm-cifar'.*ddpm-gmm2d"):
        ddpm_generator("ddpm-cifar", timestep=10)


def test_missing_and_corrupt_weight_files(tmp_path):
    src = zoo_path("ddpm_gmm2d")
    stem = tmp_path / "m"
    # .json present, .npz missing
    (tmp_path / "m.json").write_text(src.with_suffix(".json").read_text())
    with pytest.raises(ValueError, match=r"m\.npz' does not exist"):
        load_ddpm(stem)
    # corrupt .npz
    (tmp_path / "m.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match=r"m\.npz' is not a readable \.npz"):
        load_ddpm(tmp_path / "m.npz")
    # .npz of the wrong architecture
    np.savez(tmp_path / "m.npz", W0=np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"m\.npz' does not match the architecture.*params/Dense_0/kernel"):
        load_ddpm(stem)
    # wrong shape
    with np.load(src.with_suffix(".npz")) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["params/Dense_1/bias"] = np.zeros(7, np.float32)
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ValueError, match=r"'params/Dense_1/bias' has shape \(7,\), expected \(128,\)"):
        load_ddpm(stem)
    # .json missing / broken
    (tmp_path / "m.json").unlink()
    with pytest.raises(ValueError, match=r"m\.json' does not exist"):
        load_ddpm(stem)
    (tmp_path / "m.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"m\.json' is not valid JSON"):
        load_ddpm(stem)
    (tmp_path / "m.json").write_text(json.dumps({"architecture": {"hidden": 128}}))
    with pytest.raises(ValueError, match=r"'architecture' lacks"):
        load_ddpm(stem)


def test_training_script_smoke(tmp_path, capsys):
    from geomjobs.zoo.train_ddpm_gmm2d import main

    assert main(["--steps", "20", "--seed", "1", "--out", str(tmp_path), "--log-every", "10"]) == 0
    printed = capsys.readouterr().out
    assert "step     10  loss" in printed and "step     20  loss" in printed
    npz, js = tmp_path / "ddpm_gmm2d.npz", tmp_path / "ddpm_gmm2d.json"
    assert npz.is_file() and js.is_file()
    module, params, meta = load_ddpm(npz)
    assert meta["training"]["steps"] == 20 and meta["seed"] == 1
    assert [c["step"] for c in meta["training"]["loss_curve"]] == [10, 20]
    assert np.isfinite(meta["training"]["final_loss"])
    assert "--steps 20" in meta["command"]
    gen = ddpm_generator(str(tmp_path / "ddpm_gmm2d"), timestep=5, prediction="x0")
    assert gen.model_id == "ddpm:ddpm_gmm2d" and gen.output_shape == (2,)
    out = jax.jit(jax.vmap(gen.flat_fn()))(jnp.ones((3, 2), jnp.float32))
    # the freshly trained weights, through the x0 formula, by hand
    eps, _ = numpy_eps(params, meta, np.ones(2), 5)
    a = float(alpha_bar(5, meta["schedule"]))
    np.testing.assert_allclose(np.asarray(out, np.float64), np.tile((1 - np.sqrt(1 - a) * eps) / np.sqrt(a), (3, 1)),
                               rtol=1e-4, atol=1e-5)
