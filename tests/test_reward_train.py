"""The reward model (geomjobs.reward.model: network, folder format) and `geomjobs reward train`
(geomjobs.reward.data / train): z_t rebuilt bitwise from a dataset's own spec, learning known
functions and ddpm-gmm2d's psi, resume after a kill, bad input exiting 2 before any work."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geomjobs.errors import SpecError
from geomjobs.reward import model as rm

from ray_cluster import GcsEmulator


def _meta(shape, net, y=(2.0, 3.0), z=(0.5, 4.0)):
    return rm.reward_meta(shape, 1000, (0, 999), "local_scaling", net,
                          {"y_mean": y[0], "y_std": y[1], "z_mean": z[0], "z_std": z[1]}, note="test")


@pytest.mark.parametrize("shape", [(5,), (8, 8), (4, 6, 6), (6, 6, 3)])
def test_reward_folder_round_trip_and_apply(tmp_path, shape):
    net_cfg = rm.network_config(shape, hidden=16, depth=2, temb=8, channels=4)
    assert net_cfg["kind"] == ("mlp" if len(shape) == 1 else "conv")
    if len(shape) == 3:   # diffusers' channel-first latents are recognised by their small first axis
        assert net_cfg["layout"] == ("CHW" if shape[0] < shape[-1] else "HWC")
    net = rm.build_network(shape, net_cfg)
    params = rm.init_params(net, seed=1)
    meta = _meta(shape, net_cfg)
    rm.save_reward(str(tmp_path / "r"), params, meta)
    assert json.loads((tmp_path / "r" / "reward.json").read_text())["note"] == "test"
    r = rm.load_reward(str(tmp_path / "r"))
    assert r.latent_shape == shape and r.num_train_timesteps == 1000 and r.t_range == (0.0, 999.0)
    assert r.target == "local_scaling" and r.meta["note"] == "test"
    z = np.random.default_rng(0).standard_normal((3, *shape))
    t = np.array([0, 10, 999])
    y = jax.jit(r.apply)(r.params, z, t)
    assert y.shape == (3,) and y.dtype == jnp.float32
    # de-normalisation: apply = y_mean + y_std * net((z - z_mean) / z_std, t), checked against the raw network
    raw = net.apply({"params": params}, jnp.asarray((z - 0.5) / 4.0, jnp.float32), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(y), 2.0 + 3.0 * np.asarray(raw), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(r.fn()(z, t)), np.asarray(r.apply(r.params, z, t)))
    # the gradient guidance takes: finite, the latent's shape, and equal to a central difference
    g = jax.grad(lambda zz: jnp.sum(r.fn()(zz, t)))(jnp.asarray(z, jnp.float32))
    assert g.shape == (3, *shape) and np.all(np.isfinite(np.asarray(g)))
    i = (0,) * (len(shape) + 1)
    h = 1e-2
    zp, zm = z.copy(), z.copy()
    zp[i] += h
    zm[i] -= h
    fd = (float(jnp.sum(r.fn()(zp, t))) - float(jnp.sum(r.fn()(zm, t)))) / (2 * h)
    # float32 network: the central difference carries ~1e-7 * |r| / h rounding, plus O(h^2) curvature
    np.testing.assert_allclose(float(g[i]), fd, rtol=2e-2, atol=2e-3)


def test_reward_folder_on_gcs(tmp_path):
    em = GcsEmulator()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = em.host
    try:
        cfg = rm.network_config((3,), hidden=8, depth=1, temb=8)
        params = rm.init_params(rm.build_network((3,), cfg))
        uri = f"gs://{em.bucket}/rewards/r1"
        rm.save_reward(uri, params, _meta((3,), cfg))
        r = rm.load_reward(uri)
        z = np.ones((2, 3))
        np.testing.assert_array_equal(np.asarray(r.fn()(z, np.zeros(2))),
                                      np.asarray(rm.normalised_apply(rm.build_network((3,), cfg), r.normalisation)(params, z, np.zeros(2))))
    finally:
        em.stop()
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


def test_load_reward_names_the_folder_and_the_callers_key(tmp_path):
    with pytest.raises(SpecError, match="does not exist") as e:
        rm.load_reward(str(tmp_path / "nope"), key="latents.guidance.reward")
    assert e.value.key == "latents.guidance.reward" and str(tmp_path / "nope") in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="no reward.json") as e:
        rm.load_reward(str(tmp_path / "empty"))
    assert e.value.key == "reward"
    cfg = rm.network_config((3,), hidden=8, depth=1, temb=8)
    rm.save_reward(str(tmp_path / "r"), rm.init_params(rm.build_network((3,), cfg)), _meta((3,), cfg))
    (tmp_path / "r" / "reward.json").write_text("{not json")
    with pytest.raises(SpecError, match="not valid JSON"):
        rm.load_reward(str(tmp_path / "r"))
    (tmp_path / "r" / "reward.json").write_text(json.dumps({"format": rm.FORMAT}))
    with pytest.raises(SpecError, match="lacks"):
        rm.load_reward(str(tmp_path / "r"))
    meta = _meta((3,), {**cfg, "hidden": 9})      # params no longer match the network
    (tmp_path / "r" / "reward.json").write_text(json.dumps(meta))
    with pytest.raises(SpecError, match="does not match"):
        rm.load_reward(str(tmp_path / "r"))
