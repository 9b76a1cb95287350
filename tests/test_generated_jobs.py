"""Generated latents as jobs: a trajectory job of the shipped DDPM gives the same records in
process and on Ray workers (each worker rebuilds the diffusion model and reruns the sampler for
its own shards), and its per-record descriptors equal a dense-Jacobian reference at the record's
own timestep."""
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from geomjobs import run_job
from geomjobs.generators import build_generator
from geomjobs.sink.dataset import Dataset

from references import psi_nu

COLUMNS = ["sample_id", "trajectory_id", "step", "timestep", "noise_seed", "local_scaling", "local_rank",
           "local_complexity", "status"]


def trajectory_spec(count=6, steps=4):
    return {
        "model": {"kind": "zoo", "name": "ddpm-gmm2d", "prediction": "x0"},
        "latents": {"kind": "trajectory", "model": {"kind": "zoo", "name": "ddpm-gmm2d"},
                    "sampler": {"kind": "ddim", "steps": steps, "eta": 0.5}, "count": count, "seed": 7,
                    "save_latent": True},
        "descriptors": {"local_scaling": {"mode": "exact"}, "local_rank": {}, "local_complexity": {"directions": 2, "radius": 0.05}},
        "execution": {"shard_size": 3, "batch_size": 2},
    }


def test_trajectory_records_are_the_same_in_process_and_on_ray(tmp_path, monkeypatch):
    spec = trajectory_spec()
    monkeypatch.setenv("GEOMJOBS_LOCAL_MODE", "process")
    local = run_job(spec, str(tmp_path / "local"))
    monkeypatch.setenv("GEOMJOBS_LOCAL_MODE", "ray")
    spec_ray = {**spec, "execution": {**spec["execution"], "workers": 2}}
    ray_res = run_job(spec_ray, str(tmp_path / "ray"))
    assert local.ok and ray_res.ok and local.rows == ray_res.rows == 6 * 5
    a = pd.read_parquet(tmp_path / "local").sort_values("sample_id").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "ray").sort_values("sample_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a[COLUMNS], b[COLUMNS], check_exact=True)
    assert np.array_equal(np.stack(a.z), np.stack(b.z))
    workers = {m["worker"] for m in Dataset(str(tmp_path / "ray")).committed().values()}
    assert all(w.startswith("ray:") for w in workers) and {m["worker"] for m in
                                                           Dataset(str(tmp_path / "local")).committed().values()} == {"local"}
    # psi and nu at a few records: the dense Jacobian of the x0 prediction at the record's own t
    gen = build_generator({"kind": "zoo", "name": "ddpm-gmm2d"})
    abar = gen.denoiser.abar
    for i in (0, 7, 14, 29):
        z, t = jnp.asarray(np.asarray(a.z[i], np.float32)), int(a.timestep[i])

        def x0(x, t=t):
            eps = gen.denoiser.eps(gen.params, x, jnp.int32(t))
            return (x - np.sqrt(1 - abar[t]).astype(np.float32) * eps) / np.sqrt(abar[t]).astype(np.float32)

        jac = np.asarray(jax.jacfwd(x0)(z), np.float64)
        psi, nu, _ = psi_nu(jac)
        # float32 model and Jacobian: psi = sum of 2 logs of O(1) singular values, to ~1e-5
        np.testing.assert_allclose([a.local_scaling[i], a.local_rank[i]], [psi, nu], rtol=1e-4, atol=1e-4)
